import os
import sys
from collections.abc import Iterator
from importlib.metadata import version

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

SLOWEST_FIRST = ("test_gguf_llamacpp.py", "test_bench_quick.py")
"""Modules whose tests take the longest (SmolLM2 trained then run in llama.cpp; the whole quick benchmark),
run first: under `pytest -n 2` a long test that starts late leaves the other core idle while it ends. (With
`--dist loadgroup` xdist sends its groups, the units of most tests, before them.)"""


ONE_ENVIRONMENT_MARK = "transformers_independent"
"""The mark of tests whose proof does not depend on the transformers version (pure torch, file formats,
experiment trackers, llama.cpp reading our export, the benchmark scripts `make bench` runs under transformers
5): `make test` runs the suite in two environments, and these run in the transformers 5 one only."""

TRANSFORMERS_MAJOR = int(version("transformers").split(".")[0])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other test keeps its place
    if TRANSFORMERS_MAJOR < 5:
        skip = pytest.mark.skip(reason=f"{ONE_ENVIRONMENT_MARK}: runs once, in the transformers 5 environment")
        for item in items:
            if item.get_closest_marker(ONE_ENVIRONMENT_MARK):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Each test starts on torch's one thread: a training run sets its config's `threads` for the process,
    and two xdist workers on two threads each would share two cores."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
