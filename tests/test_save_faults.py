"""Saves killed for real, and two processes saving at once, on a 4 MB LoRA adapter.

One helper process imports deltatune once, makes two adapter versions (other values and another
`lora_alpha`, so a mix of the two shows) and forks the savers on request: a child that saves the two
versions in turn until the test SIGKILLs it at a random moment, or two children released together
that save one version each. After each, the folder must load as one version whole, and a save must
leave no staging behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import deltatune
from save_checks import leftovers

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the savers are forked"),
    pytest.mark.transformers_independent,  # a torch module's adapter saved: files and processes only
]

VERSIONS = """
import torch
from torch import nn

import deltatune

torch.set_num_threads(1)


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1024, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def version(index: int) -> deltatune.DeltaModel:
    '''Adapter version `index` (0 or 1): 4 MB of LoRA weights drawn from seed `index`.'''
    torch.manual_seed(index)
    config = deltatune.LoraConfig(r=512, lora_alpha=8 * (index + 1), target_modules=["proj"], init_lora_weights=False)
    return deltatune.attach(Projection(), config)
"""

HELPER = (
    VERSIONS
    + """
import os
import sys
import time
import traceback

folder = sys.argv[1]
versions = [version(0), version(1)]
start = time.perf_counter()
versions[0].save(folder)
print("ready", time.perf_counter() - start, flush=True)


def saving(indices, wait_for=None):
    '''Fork a child that saves the versions `indices` (in turn, forever if the iterator is).'''
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if wait_for is not None:
            os.read(wait_for, 1)
        for index in indices:
            versions[index].save(folder)
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


def forever():
    while True:
        yield 0
        yield 1


for line in sys.stdin:
    if line.strip() == "loop":
        pid = saving(forever())
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    elif line.strip() == "race":
        read_end, write_end = os.pipe()
        pids = [saving([index], wait_for=read_end) for index in (0, 1)]
        os.write(write_end, b"go")
        os.close(read_end)
        os.close(write_end)
        print("done", *[os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids], flush=True)
"""
)


class Helper:
    """The helper process, and what the test knows about the two versions."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process = subprocess.Popen(
            [sys.executable, "-c", HELPER, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        ready = self.read()
        assert ready.startswith("ready"), ready
        self.save_seconds = float(ready.split()[1])
        namespace: dict = {}
        exec(VERSIONS, namespace)
        self.projection = namespace["Projection"]
        self.versions = [namespace["version"](index) for index in (0, 1)]
        self.expected = [(model.configs["default"].lora_alpha, adapter_tensors(model)) for model in self.versions]

    def read(self) -> str:
        line = self.process.stdout.readline()
        assert line, "the helper process ended"
        return line.strip()

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def saved_version(self) -> int | None:
        """Which version the folder loads as (None: a mix, or neither)."""
        loaded = deltatune.load(self.projection(), str(self.folder))
        found = (loaded.configs["default"].lora_alpha, adapter_tensors(loaded))
        for index, (alpha, tensors) in enumerate(self.expected):
            if (
                found[0] == alpha
                and found[1].keys() == tensors.keys()
                and all(torch.equal(found[1][k], tensors[k]) for k in tensors)
            ):
                return index
        return None

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def adapter_tensors(model: deltatune.DeltaModel) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if ".deltatune." in name}


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory):
    started = Helper(tmp_path_factory.mktemp("faults") / "adapter")
    yield started
    started.close()


def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_adapter_and_the_next_save_no_staging(
    helper: Helper,
) -> None:
    moments = random.Random(20240610)
    for kill in range(24):
        helper.send("loop")
        pid = int(helper.read())
        time.sleep(moments.uniform(0, 8 * helper.save_seconds))  # over the first few saves of the child
        os.kill(pid, signal.SIGKILL)
        assert helper.read() == "reaped"
        assert helper.saved_version() in (0, 1), f"after kill {kill} the folder does not load as one version"
        helper.versions[kill % 2].save(str(helper.folder))
        assert leftovers(helper.folder) == [], f"after kill {kill} a save left staging behind"


def test_two_processes_saving_to_one_folder_leave_one_of_the_adapters_whole(helper: Helper) -> None:
    for race in range(30):
        helper.send("race")
        assert helper.read() == "done 0 0", f"a save of race {race} failed"
        assert helper.saved_version() in (0, 1), f"after race {race} the folder mixes the two saves"
    assert leftovers(helper.folder) == []
