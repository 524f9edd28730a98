"""The command drops the import notes of optional packages (`deltatune.train.import_notes`): torchao's
"Failed to load" warnings for extensions built for another Python or GPU, torch's pytree deprecation note
for torchao's Enums; it keeps every other record of those loggers. The reference is what torchao's
import (which transformers makes whenever torchao is installed) logs: where it makes no such note, this
torchao has nothing to quiet and the process test skips."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from deltatune.train.import_notes import quiet_import_notes

NOTE_WORDS = ("Failed to load", "is an Enum subclass")
PROBE = f"""
import logging, sys
made = []
factory = logging.getLogRecordFactory()
def counting_factory(*args, **kwargs):
    record = factory(*args, **kwargs)
    made.append(record.getMessage())
    return record
logging.setLogRecordFactory(counting_factory)
from deltatune.train.import_notes import quiet_import_notes
quiet_import_notes()
import torchao
print(sum(any(word in message for word in {NOTE_WORDS!r}) for message in made))
"""
"""Imports torchao with the command's filters in place; prints how many notes torchao's import made (a
record is made before a logger's filters drop it, so the count is the reference: what an unfiltered
import prints)."""


def test_the_command_drops_torchaos_import_notes_that_its_import_makes() -> None:
    pytest.importorskip("torchao")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, check=True)
    if int(run.stdout.split()[-1]) == 0:
        pytest.skip("this torchao loads all its extensions: its import makes no note to quiet")
    assert not any(word in run.stderr for word in NOTE_WORDS), run.stderr


def test_other_records_of_those_loggers_still_reach_the_user(caplog: pytest.LogCaptureFixture) -> None:
    quiet_import_notes()
    quiet_import_notes()
    logger = logging.getLogger("torchao")
    assert len(logger.filters) == len({type(existing) for existing in logger.filters})
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning("Failed to load /x/_C.so: not this Python")
        logger.warning("int4 weight-only needs a GPU")
        logging.getLogger("torch.utils._pytree").warning("another pytree note %s", 1)
    assert [record.getMessage() for record in caplog.records] == [
        "int4 weight-only needs a GPU",
        "another pytree note 1",
    ]
