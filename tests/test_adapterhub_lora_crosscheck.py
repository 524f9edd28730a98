"""Our LoRA folders in AdapterHub's format against AdapterHub itself (runs where `adapters` is installed:
the transformers 4.57 line): every LoRA setting the writer accepts loads in AdapterHub as the model we
adapted, padded batches included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

adapters = pytest.importorskip("adapters")

import deltatune  # noqa: E402
from test_adapterhub_lora_writer import EXPRESSIBLE, PLAIN, randomized  # noqa: E402
from test_adapterhub_mam import ATOL, adapterhub_mam, eager, outputs  # noqa: E402


@pytest.mark.parametrize("case", list(EXPRESSIBLE))
def test_an_accepted_lora_loads_in_adapterhub_as_the_adapted_model(case: str, tmp_path: Path) -> None:
    config = deltatune.LoraConfig(**{**PLAIN, **EXPRESSIBLE[case]})
    ours = randomized(deltatune.attach(eager("llama"), config, name="task"))
    expected = outputs(ours, "llama")
    with ours.disabled():
        assert not torch.allclose(outputs(ours, "llama"), expected, atol=1e-3)
    ours.save(tmp_path / "task", format="adapterhub")
    reference = adapterhub_mam("llama", adapters.LoRAConfig(r=2), name="other")
    assert reference.load_adapter(str(tmp_path / "task"), use_safetensors=True) == "task"
    reference.set_active_adapters("task")
    torch.testing.assert_close(outputs(reference, "llama"), expected, atol=ATOL, rtol=0)
