"""FSDP2 training (`data_parallel: fsdp`) on CPU (gloo), two processes under `torchrun`: against DDP
(the reference: every rank holds the whole model) for the same seed, the adapter, the checkpoint
files, the loss and the evaluation agree (≤ 1e-5), while each rank holds only its shards; a NaN in
one rank's shard is seen by every rank (so all stop together); a run resumed from a mid-run
checkpoint ends bit-exactly where the uninterrupted run ends (under DDP too).

One launch runs all of it (four trainings in one process group: starting the processes is most of
the time). The data has examples of many lengths, and the adapter dropout, so that each rank's
random state moves on by its own count of draws and a resume must restore each rank's."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import textwrap
import typing
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune import LoraConfig
from deltatune.errors import DeltaTuneError
from deltatune.train import TrainConfig, distributed, sharding
from deltatune.train.cli import main
from test_distributed import LAUNCHERS
from training_fixtures import WORDS, task_config, write_jsonl

pytestmark = pytest.mark.xdist_group("fsdp")
"""One worker runs the module (`--dist loadgroup`): the other would wait on the lock while the launch runs."""

SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    import torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from deltatune.train import TrainConfig, train
    from deltatune.train.sharding import all_finite

    config_path, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def run(name, data_parallel, resume=None):
        overrides = [f"output_dir={root}/{name}", f"data_parallel={data_parallel}"]
        return train(TrainConfig.from_yaml(config_path, overrides), resume=resume, progress=False)

    for data_parallel in ("ddp", "fsdp"):
        result = run(data_parallel, data_parallel)
        if data_parallel == "fsdp":
            result.run.delta_model.base_model.reshard()  # the root's weights stay gathered after a forward
            parameters = list(result.run.delta_model.parameters())
            shards = {
                "sharded": all(isinstance(p, DTensor) for p in parameters),
                "local": sum(p.to_local().numel() for p in parameters),
                "whole": sum(p.numel() for p in parameters),
            }
            trainable = [p for p in parameters if p.requires_grad]
            shards["finite"] = [all_finite(trainable)]
            if rank == 1:  # a NaN in one element of one rank's shard
                with torch.no_grad():
                    next(p for p in trainable if p.to_local().numel()).to_local().view(-1)[0] = float("nan")
            shards["finite"].append(all_finite(trainable))
            with open(f"{root}/shards-rank{rank}.json", "w") as file:
                json.dump(shards, file)
        if rank == 0:  # the interrupted run: only the checkpoint of step 3 is left
            shutil.copytree(f"{root}/{data_parallel}/checkpoints", f"{root}/{data_parallel}-resumed/checkpoints")
        dist.barrier()
        run(f"{data_parallel}-resumed", data_parallel, resume=True)
    dist.destroy_process_group()
""")

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors")
TOLERANCE = 1e-5


def varied_records(count: int = 16, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs of 1 to 8 words each."""
    rng = random.Random(seed)
    return [
        {
            "prompt": " ".join(rng.sample(WORDS, rng.randint(1, 8))),
            "completion": " ".join(rng.sample(WORDS, rng.randint(1, 8))),
        }
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The four trainings' output folders, and what each rank reported of its shards. Launched once a
    session, also when pytest-xdist spreads these tests over workers: they share the session's
    folder, and the first to take the lock launches."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    root = shared / "fsdp-runs"
    with FileLock(str(shared / "fsdp-runs.lock")):
        if not (root / "launched").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            launch(root)
            (root / "launched").touch()
    shards = [json.loads((root / f"shards-rank{rank}.json").read_text()) for rank in (0, 1)]
    return {"root": root, "shards": shards}


def launch(root: Path) -> None:
    """`SCRIPT` in two processes under torchrun, on the varied data with LoRA (dropout, a trained head)."""
    data = write_jsonl(root / "varied.jsonl", varied_records())
    config = task_config(
        root,
        "causal-lm",
        train_file=data,
        eval_file=data,
        eval_every=3,
        save_every=3,
        batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        device="cpu",
        adapter={
            "method": "lora",
            "r": 4,
            "target_modules": "all-linear",
            "lora_dropout": 0.1,
            "modules_to_save": ["lm_head"],  # trainable weights in the root's shards too
        },
    )
    script = root / "run.py"
    script.write_text(SCRIPT, encoding="utf-8")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [*LAUNCHERS["torchrun"], str(script), str(config), str(root)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def tensors(folder, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def close(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """The largest difference between two tensor files of the same keys and shapes."""
    assert expected.keys() == got.keys() and expected
    assert all(expected[key].shape == got[key].shape for key in expected)
    return max(float((expected[key].double() - got[key].double()).abs().max()) for key in expected)


def history(folder) -> list[dict[str, float]]:
    return json.loads((folder / "metrics.json").read_text())["history"]


def test_fsdp_shards_every_weight_over_the_ranks(runs) -> None:
    shards = runs["shards"]
    assert all(rank["sharded"] for rank in shards)
    assert shards[0]["whole"] == shards[1]["whole"] == shards[0]["local"] + shards[1]["local"]
    assert 0 < shards[1]["local"] < shards[0]["local"] + shards[1]["local"]


def test_a_non_finite_shard_on_one_rank_is_seen_by_every_rank(runs) -> None:
    assert [rank["finite"] for rank in runs["shards"]] == [[True, False], [True, False]]


def test_fsdp_saves_the_adapter_ddp_saves(runs) -> None:
    ddp, fsdp = runs["root"] / "ddp", runs["root"] / "fsdp"
    name = "adapter/adapter_model.safetensors"
    assert close(tensors(ddp, name), tensors(fsdp, name)) <= TOLERANCE
    config = "adapter/adapter_config.json"
    assert (ddp / config).read_text() == (fsdp / config).read_text()


def test_fsdp_checkpoints_hold_the_whole_tensors_ddp_writes(runs) -> None:
    ddp, fsdp = (runs["root"] / name / "checkpoints" / "step-000003" for name in ("ddp", "fsdp"))
    for name in CHECKPOINT_FILES:
        assert close(tensors(ddp, name), tensors(fsdp, name)) <= TOLERANCE
    assert (
        tensors(ddp, "random.safetensors").keys() == tensors(fsdp, "random.safetensors").keys() == {"cpu", "rank1.cpu"}
    )


def test_fsdp_losses_and_evaluations_are_those_of_ddp(runs) -> None:
    ddp, fsdp = history(runs["root"] / "ddp"), history(runs["root"] / "fsdp")
    assert [entry.keys() for entry in ddp] == [entry.keys() for entry in fsdp]
    assert sum("eval_loss" in entry for entry in fsdp) == 2
    for expected, got in zip(ddp, fsdp):
        assert all(got[key] == pytest.approx(value, abs=TOLERANCE) for key, value in expected.items())


@pytest.mark.parametrize("data_parallel", ["fsdp", "ddp"])
def test_a_resumed_run_ends_bit_exactly_where_the_uninterrupted_run_ends(runs, data_parallel: str) -> None:
    whole, resumed = runs["root"] / data_parallel, runs["root"] / f"{data_parallel}-resumed"
    name = "adapter/adapter_model.safetensors"
    expected, got = tensors(whole, name), tensors(resumed, name)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert history(whole) == history(resumed)


def test_fsdp_with_a_quantized_base_is_refused_before_loading(tmp_path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm")
    assert main(["train", str(config), "data_parallel=fsdp", "quantize=nf4", "--quiet"]) == 2
    assert "data_parallel=fsdp does not shard a quantized base" in capsys.readouterr().err


def test_fsdp_on_a_model_without_transformer_blocks_is_a_clear_error() -> None:
    delta_model = deltatune.attach(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoraConfig(r=2, target_modules=["0"])
    )
    with pytest.raises(DeltaTuneError, match="data_parallel=fsdp shards the model by transformer block and found none"):
        sharding.shard(delta_model, torch.device("cpu"))


def test_every_data_parallel_setting_has_an_engine() -> None:
    annotation = typing.get_type_hints(TrainConfig)["data_parallel"]
    assert set(typing.get_args(annotation)) == set(distributed.DATA_PARALLEL)
