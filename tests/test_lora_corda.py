"""CorDA (`deltatune.initialize_from_data` with init_lora_weights="corda") against peft 0.21's
`preprocess_corda` on the same samples and base weights: the same factors (both modes), the same
outputs while our base stays bit-identical; trained, saved and converted to plain LoRA like peft's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from deltatune.files import read_tensors
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_corda():
    """peft's `preprocess_corda` and `CordaConfig`. peft 0.21's corda.py imports `dataclass` from attrs,
    which peft does not declare as a dependency and these environments lack; for its one record class
    the standard library's `dataclass` is the same, so it stands in when attrs is missing."""
    try:
        import attr  # noqa: F401
    except ImportError:
        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda, CordaConfig


def samples(count: int = 6) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 96, (1, 16), generator=generator)} for _ in range(count)]


def both(base: torch.nn.Module, method: str) -> tuple[deltatune.DeltaModel, peft.PeftModel]:
    """Our CorDA adapter and peft's on copies of `base`, from the same samples (peft: one per call)."""
    preprocess_corda, CordaConfig = peft_corda()
    fields = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "corda"}
    peft_config = peft.LoraConfig(**fields, corda_config=CordaConfig(corda_method=method))
    theirs_base = copy.deepcopy(base)
    preprocess_corda(theirs_base, peft_config, run_model=lambda: [theirs_base(**sample) for sample in samples()])
    theirs = peft.get_peft_model(theirs_base, peft_config)
    ours = deltatune.attach(copy.deepcopy(base), deltatune.LoraConfig(**fields, corda_config={"corda_method": method}))
    deltatune.initialize_from_data(ours, [{"input_ids": torch.cat([sample["input_ids"] for sample in samples()])}])
    return ours, theirs


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    inputs = samples(3)[0] | {"input_ids": torch.cat([sample["input_ids"] for sample in samples(3)])}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_the_factors_and_outputs_equal_peft_on_the_same_samples_and_the_base_stays(method: str) -> None:
    base = build("llama")
    ours, theirs = both(base, method)
    state = theirs.state_dict()
    for name, site in ours.sites():
        adapter = site.adapters["default"]
        for factor in ("lora_A", "lora_B"):
            expected = state[f"base_model.model.{name}.{factor}.default.weight"]
            torch.testing.assert_close(getattr(adapter, factor), expected, atol=1e-6, rtol=0, msg=f"{name} {factor}")
        assert adapter.lora_B0.abs().max() > 1e-3
    torch.testing.assert_close(run(ours, "llama"), run(theirs, "llama"), atol=1e-5, rtol=0)
    original = base.state_dict()
    assert all(torch.equal(ours.base_model.get_parameter(name), original[name]) for name in original)


def test_a_trained_corda_adapter_converts_as_peft_does_and_saves_only_converted_for_peft(tmp_path: Path) -> None:
    """The initial factors come from data: our folder keeps them, peft's conversion and ours give the same
    plain LoRA of rank 2r, and an unconverted peft folder is refused (peft would need the data again)."""
    base = build("llama")
    ours, theirs = both(base, "ipm")
    theirs.save_pretrained(str(tmp_path / "initial"))
    train_steps(theirs)
    train_steps(ours)
    expected = run(theirs, "llama")
    torch.testing.assert_close(run(ours, "llama"), expected, atol=1e-5, rtol=0)
    theirs.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    torch.testing.assert_close(
        run(deltatune.load(copy.deepcopy(base), str(tmp_path / "converted")), "llama"), expected, atol=1e-5, rtol=0
    )
    with pytest.raises(deltatune.DeltaTuneError, match=r"'corda'.*needs the data again.*to_plain_lora"):
        ours.save(str(tmp_path / "unconverted"), format="peft")
    ours.save(str(tmp_path / "ours"))
    torch.testing.assert_close(
        run(deltatune.load(copy.deepcopy(base), str(tmp_path / "ours")), "llama"), run(ours, "llama"), atol=0, rtol=0
    )
    deltatune.to_plain_lora(ours, "default", "plain")
    ours.save(str(tmp_path / "ours-converted"), ["plain"], format="peft")
    mine = read_tensors(tmp_path / "ours-converted" / "adapter_model.safetensors")
    peft_converted = read_tensors(tmp_path / "converted" / "adapter_model.safetensors")
    assert mine.keys() == peft_converted.keys()
    for key, tensor in peft_converted.items():
        torch.testing.assert_close(mine[key], tensor, atol=1e-5, rtol=0, msg=key)
    configs = [
        json.loads((tmp_path / kind / "adapter_config.json").read_text()) for kind in ("converted", "ours-converted")
    ]
    assert [(config["r"], config["lora_alpha"]) for config in configs] == [(8, 16), (8, 16)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cache_file": "x.pt"}, r"corda_config has no cache_file"),
        ({"corda_method": "svd"}, r'corda_config\.corda_method must be "ipm" or "kpm", got \'svd\''),
    ],
)
def test_a_bad_corda_setting_is_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.LoraConfig(init_lora_weights="corda", corda_config=settings)


def test_deltatune_train_starts_corda_from_its_first_batches_and_the_loss_falls(tmp_path: Path) -> None:
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import train
    from training_fixtures import task_config

    adapter = {
        "method": "lora",
        "r": 4,
        "target_modules": "all-linear",
        "init_lora_weights": "corda",
        "corda_config": {"batches": 2},
    }
    result = train(TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", method=adapter)), progress=False)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]
    initial = [site.adapters["default"].lora_B0 for _, site in result.run.delta_model.sites()]
    assert initial and all(tensor.abs().max() > 0 for tensor in initial)


def test_a_corda_run_resumes_bit_exactly(tmp_path: Path) -> None:
    """The resumed run starts CorDA again on the same first batches, then takes the checkpoint's tensors
    (the initial factors among them)."""
    from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run
    from training_fixtures import task_config

    adapter = {**RESUME_SETTINGS["adapter"], "init_lora_weights": "corda", "corda_config": {"batches": 2}}
    settings = {**RESUME_SETTINGS, "adapter": adapter}
    assert_resume_equals_the_uninterrupted_run(task_config(tmp_path, "causal-lm", **settings), tmp_path)
