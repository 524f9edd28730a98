"""Data-parallel training on CPU (gloo): two processes under `torchrun` (and under the `accelerate`
launcher where it is installed) train one adapter, with gradient accumulation (DDP `no_sync` on the
first micro-batch); the loss falls and both ranks end with the same adapter weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training_fixtures import task_config

SCRIPT = textwrap.dedent("""
    import os, sys
    from safetensors.torch import save_file
    from deltatune.train import TrainConfig, train

    result = train(TrainConfig.from_yaml(sys.argv[1]), progress=False)
    parameters = result.run.delta_model.named_parameters()
    trainable = {name: p.detach().contiguous() for name, p in parameters if p.requires_grad}
    save_file(trainable, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors"))
""")

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ],
}


def launch(launcher: str, config: Path, folder: Path) -> None:
    """`SCRIPT` in two processes under `launcher`: each rank writes its trainable weights into `folder`."""
    script = folder / "run.py"
    script.write_text(SCRIPT, encoding="utf-8")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [*LAUNCHERS[launcher], str(script), str(config), str(folder)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_train_one_adapter_and_agree(launcher: str, tmp_path) -> None:
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    config = task_config(
        tmp_path,
        "causal-lm",
        batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        eval_file=None,
        adapter={"method": "lora", "r": 4, "target_modules": "all-linear", "lora_dropout": 0.1},
    )
    launch(launcher, config, tmp_path)
    ranks = [load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])
    losses = [entry["loss"] for entry in json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_a_short_last_step_over_two_processes_equals_one_process_reading_the_same_examples(tmp_path) -> None:
    """16 examples, 7 a rank: each epoch's second step has 2 examples, both on rank 0, so rank 1 runs a
    stand-in that counts zero; the adapter equals one process's reading 14 a step (the same examples,
    each step's gradient the mean over them; seq-cls, a loss that is a mean over examples). The one
    process is this one, with no process group: the plain computation, without a launcher to start."""
    from deltatune.train import TrainConfig, train

    (tmp_path / "processes2").mkdir()
    config = task_config(tmp_path / "processes2", "seq-cls", batch_size=7, max_steps=4, eval_file=None)
    launch("torchrun", config, tmp_path / "processes2")
    two_processes = load_file(str(tmp_path / "processes2" / "rank0.safetensors"))

    (tmp_path / "processes1").mkdir()
    config = task_config(tmp_path / "processes1", "seq-cls", batch_size=14, max_steps=4, eval_file=None)
    parameters = train(TrainConfig.from_yaml(config), progress=False).run.delta_model.named_parameters()
    one_process = {name: parameter.detach() for name, parameter in parameters if parameter.requires_grad}
    assert two_processes.keys() == one_process.keys() and one_process
    for name in one_process:
        torch.testing.assert_close(two_processes[name], one_process[name], rtol=1e-4, atol=1e-5)
