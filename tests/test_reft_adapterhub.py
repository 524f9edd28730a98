"""ReFT against AdapterHub 1.3 (runs where `adapters` is installed: the transformers 4.57 line).

AdapterHub's interventions get random weights (an orthogonal R keeps its ±1 diagonal, which torch's
parametrization reads as signs, and random reflectors below it), its folder is loaded here, and ours is
loaded there: outputs agree to 1e-5 on tiny Llama, GPT-2, BERT and T5, on batches padded left and right.
On T5 AdapterHub reads the positions of every stack from the encoder's attention mask, so its decoder
interventions on a padded batch sit at the encoder's positions: where those are positions the decoder has too
(a prefix of right-padded rows, or interventions in the encoder only) both libraries agree; where they fall
past the decoder's tokens AdapterHub's forward raises (`ADAPTERHUB_T5_FAILURES`), and those cases skip.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

adapters = pytest.importorskip("adapters")

import deltatune  # noqa: E402
from deltatune.errors import DeltaTuneError  # noqa: E402
from tiny_models import ARCHS, build  # noqa: E402

ATOL = 1e-5
LENGTHS = (7, 5, 4)
"""Real tokens per row: each row is at least prefix + suffix long, where both libraries pick the same positions."""


def padded_inputs(arch: str, side: str | None, seed: int = 1) -> dict[str, torch.Tensor]:
    """The arch's inputs; with `side`, rows of `LENGTHS` real tokens padded on that side."""
    inputs = ARCHS[arch].inputs(seed)
    if side is None:
        return inputs
    tokens = inputs["input_ids"]
    mask = torch.zeros_like(tokens)
    for row, length in enumerate(LENGTHS):
        columns = slice(0, length) if side == "right" else slice(tokens.shape[1] - length, None)
        mask[row, columns] = 1
    inputs["input_ids"] = tokens.masked_fill(mask == 0, 0)
    inputs["attention_mask"] = mask
    return inputs


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def adapterhub_model(arch: str) -> torch.nn.Module:
    model = copy.deepcopy(build(arch))
    adapters.init(model)
    return model


def randomize_adapterhub_reft(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for AdapterHub's interventions; an orthogonal R's `original` keeps a ±1 diagonal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".refts." not in name:
                continue
            values = 0.3 * torch.randn(parameter.shape, generator=generator)
            if name.endswith("parametrizations.weight.original"):
                signs = torch.randint(0, 2, (min(parameter.shape),), generator=generator) * 2 - 1
                values.diagonal().copy_(signs.float())
            parameter.copy_(values)


def randomize_ours(delta_model: deltatune.DeltaModel, name: str = "default", seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters(name):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


CONFIGS = {
    "loreft": lambda: dict(prefix_positions=2, suffix_positions=2, r=3, orthogonality=True),
    "loreft-tied-prefix": lambda: dict(prefix_positions=3, suffix_positions=0, r=2, tied_weights=True),
    "noreft-relu": lambda: dict(prefix_positions=2, suffix_positions=2, r=2, orthogonality=False, non_linearity="relu"),
    "loreft-layers": lambda: dict(prefix_positions=1, suffix_positions=3, r=2, layers=[1]),
}
SETTINGS = [
    pytest.param(arch, side, id=f"{arch}-{side or 'unpadded'}")
    for arch in ("llama", "gpt2", "bert", "t5")
    for side in (None, "left", "right")
]
ADAPTERHUB_T5_FAILURES = {("loreft", "left"), ("loreft", "right"), ("noreft-relu", "left"), ("noreft-relu", "right")}
ADAPTERHUB_T5_FAILURES.add(("loreft-tied-prefix", "left"))
"""(config, side) whose padded T5 batch AdapterHub cannot run: its decoder's suffix positions (left padded, its
prefix positions too), read from the encoder's mask, fall past the decoder's 5 tokens (an index out of bounds)."""


def skip_where_adapterhub_fails(config_name: str, arch: str, side: str | None) -> None:
    if arch == "t5" and (config_name, side) in ADAPTERHUB_T5_FAILURES:
        pytest.skip(
            "AdapterHub takes T5's decoder positions from the encoder's attention mask; here they fall past "
            "the decoder's tokens and its forward raises (index out of bounds)"
        )


@pytest.mark.parametrize("config_name,side", sorted(ADAPTERHUB_T5_FAILURES))
def test_adapterhub_fails_the_padded_t5_batches_the_cross_checks_skip(config_name: str, side: str) -> None:
    """The skips hold only while AdapterHub raises on them; once it runs them, they are to be cross-checked."""
    reference = adapterhub_model("t5")
    reference.add_adapter("task", config=adapters.LoReftConfig(**CONFIGS[config_name]()))
    reference.set_active_adapters("task")
    with pytest.raises(RuntimeError, match="out of bounds"):
        outputs(reference.eval(), padded_inputs("t5", side))


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("arch,side", SETTINGS)
def test_adapterhub_reft_folder_gives_the_same_outputs(config_name: str, arch: str, side: str | None, tmp_path) -> None:
    skip_where_adapterhub_fails(config_name, arch, side)
    reference = adapterhub_model(arch)
    reference.add_adapter("task", config=adapters.LoReftConfig(**CONFIGS[config_name]()))
    randomize_adapterhub_reft(reference)
    reference.set_active_adapters("task")
    reference.eval()
    inputs = padded_inputs(arch, side)
    expected = outputs(reference, inputs)
    reference.save_adapter(str(tmp_path / "task"), "task")

    loaded = deltatune.load(build(arch), tmp_path / "task")
    assert loaded.active_adapters == ("task",) and isinstance(loaded.configs["task"], deltatune.ReftConfig)
    torch.testing.assert_close(outputs(loaded, inputs), expected, atol=ATOL, rtol=0)
    with loaded.disabled():
        assert not torch.allclose(outputs(loaded, inputs), expected, atol=1e-3)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("arch,side", SETTINGS)
def test_our_reft_folder_loads_in_adapterhub_with_our_outputs(
    config_name: str, arch: str, side: str | None, tmp_path: Path
) -> None:
    skip_where_adapterhub_fails(config_name, arch, side)
    ours = deltatune.attach(build(arch), deltatune.LoReftConfig(**CONFIGS[config_name]()))
    randomize_ours(ours)
    inputs = padded_inputs(arch, side)
    expected = outputs(ours, inputs)
    ours.save(tmp_path / "task", format="adapterhub")

    reference = adapterhub_model(arch)
    name = reference.load_adapter(str(tmp_path / "task"), use_safetensors=True)
    reference.set_active_adapters(name)
    reference.eval()
    torch.testing.assert_close(outputs(reference, inputs), expected, atol=ATOL, rtol=0)


def test_a_direft_adapter_is_not_written_in_adapterhub_layout(tmp_path: Path) -> None:
    """AdapterHub would load it with R h subtracted (next test): refused by name, nothing written."""
    ours = deltatune.attach(build("llama"), deltatune.DiReftConfig(prefix_positions=2, r=2))
    with pytest.raises(DeltaTuneError, match="subtract_projection=False"):
        ours.save(tmp_path / "task", format="adapterhub")
    assert not (tmp_path / "task").exists()


def test_an_adapterhub_direft_folder_reloads_with_the_projection_subtracted_there_and_here(tmp_path: Path) -> None:
    """AdapterHub does not keep `subtract_projection` (a class attribute, not a config field): its reload
    of a DiReFT folder subtracts R h, even from a file that records False. A folder without the key loads
    here as it reloads there; one that records False loads here as trained."""
    reference = adapterhub_model("gpt2")
    reference.add_adapter("task", config=adapters.DiReftConfig(prefix_positions=2, r=2))
    randomize_adapterhub_reft(reference)
    reference.set_active_adapters("task")
    reference.eval()
    inputs = padded_inputs("gpt2", "right")
    as_trained = outputs(reference, inputs)
    reference.save_adapter(str(tmp_path / "task"), "task")

    def reloaded_in_adapterhub() -> torch.Tensor:
        model = adapterhub_model("gpt2")
        model.set_active_adapters(model.load_adapter(str(tmp_path / "task")))
        return outputs(model.eval(), inputs)

    as_reloaded = reloaded_in_adapterhub()
    assert not torch.allclose(as_reloaded, as_trained, atol=1e-3)
    loaded = deltatune.load(build("gpt2"), tmp_path / "task")
    assert loaded.configs["task"].subtract_projection
    torch.testing.assert_close(outputs(loaded, inputs), as_reloaded, atol=ATOL, rtol=0)

    config_file = tmp_path / "task" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert "subtract_projection" not in saved["config"]
    config_file.write_text(json.dumps({**saved, "config": {**saved["config"], "subtract_projection": False}}))
    torch.testing.assert_close(reloaded_in_adapterhub(), as_reloaded, atol=0, rtol=0)
    recorded = deltatune.load(build("gpt2"), tmp_path / "task")
    torch.testing.assert_close(outputs(recorded, inputs), as_trained, atol=ATOL, rtol=0)
