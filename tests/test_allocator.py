"""The trainer's heap policy (`deltatune.train.allocator`) returns freed tensor memory to the system, where
glibc's defaults keep it resident, and a trim returns the free pages inside the heap; `deltatune train`
applies the policy before loading its model when `release_freed_memory: true` (opt-in: it slows a step),
and trims after loading on any setting.

Each measurement runs in a fresh interpreter: glibc's mmap threshold depends on what the process has
allocated and freed before, and the policy, once set, stays for the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import deltatune.train.loop
import deltatune.train.models
from deltatune.train import allocator
from deltatune.train.config import TrainConfig
from training_fixtures import task_config

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="the heap policy is glibc's (not this C library)")

RETAINED = """
import sys, resource
import torch
from deltatune.train.allocator import release_freed_memory
if sys.argv[1] == "policy":
    assert release_freed_memory()
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()
first = torch.ones(8 << 18)  # 8 MiB, mapped and freed: glibc's default threshold rises to its size
del first
before = resident()
blocks, kept = [], []
for _ in range(32):  # 64 MiB of 2 MiB activations, each followed by a small tensor a step keeps
    blocks.append(torch.ones(2 << 18))
    kept.append(torch.ones(1 << 15))
del blocks
if sys.argv[2] == "trim":
    from deltatune.train.allocator import return_free_heap_pages
    assert return_free_heap_pages()
print(resident() - before)
"""


def retained_bytes(mode: str, trim: bool = False) -> int:
    """Resident bytes added by 64 MiB of 2 MiB tensors made and freed and 4 MiB kept, in a fresh process
    (with `trim`, after `return_free_heap_pages`)."""
    finished = subprocess.run(
        [sys.executable, "-c", RETAINED, mode, "trim" if trim else "no"],
        capture_output=True,
        text=True,
        env=os.environ,
        check=True,
    )
    return int(finished.stdout.split()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_freed_tensors_are_returned_under_the_policy_and_kept_without_it():
    assert retained_bytes("default") > 32 << 20  # the premise: glibc keeps freed 2 MiB tensors resident
    assert retained_bytes("policy") < 8 << 20  # the 4 MiB of small tensors still held, and no freed block


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_trimming_returns_the_free_pages_inside_the_heap():
    assert retained_bytes("default", trim=True) < 8 << 20  # what glibc kept above (test before) goes back


def test_the_trainer_applies_the_policy_only_when_asked_and_always_trims_after_loading(tmp_path, monkeypatch):
    applied = []
    monkeypatch.setattr(deltatune.train.loop, "release_freed_memory", lambda: applied.append("policy"))
    monkeypatch.setattr(
        deltatune.train.loop, "load_model", lambda *args, **kwargs: applied.append("load") or original(*args, **kwargs)
    )
    monkeypatch.setattr(deltatune.train.loop, "return_free_heap_pages", lambda: applied.append("trim"))
    original = deltatune.train.models.load_model
    config = task_config(tmp_path, "causal-lm")
    for release in ("true", "false"):
        deltatune.train.loop.prepare_run(TrainConfig.from_yaml(config, [f"release_freed_memory={release}"]))
    assert applied == ["policy", "load", "trim", "load", "trim"]
    assert TrainConfig.from_yaml(config).release_freed_memory is False  # opt-in: it slows every step


def test_under_the_policy_the_trainer_trims_the_heap_after_every_step(tmp_path, monkeypatch):
    trims = []
    monkeypatch.setattr(deltatune.train.loop, "release_freed_memory", lambda: None)
    monkeypatch.setattr(deltatune.train.loop, "return_free_heap_pages", lambda: trims.append(1))
    for release, expected in (("true", 1 + 3), ("false", 1)):  # the trim after loading, then one a step
        trims.clear()
        (tmp_path / release).mkdir()
        config = task_config(tmp_path / release, "causal-lm", max_steps=3)
        deltatune.train.loop.train(TrainConfig.from_yaml(config, [f"release_freed_memory={release}"]), progress=False)
        assert len(trims) == expected, release
