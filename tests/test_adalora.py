"""AdaLoRA against peft 0.21's: the same outputs for the same weights, the same rank budget for the same
gradients, each other's folders (also those saved after rank allocation), and training through
`deltatune train` with a bit-exact `--resume`."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.errors import DeltaTuneError
from deltatune.methods.adalora import SvdLinear
from deltatune.train.cli import main
from deltatune.train.method_defaults import DEFAULTS
from resume_checks import assert_resume_equals_the_uninterrupted_run
from tiny_models import build, run, token_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::FutureWarning")

ATOL = 1e-5
ARCHS = ["llama", "gpt2", "bert", "t5"]
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value"],
    "t5": ["q", "v", "wi"],
}
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
"""Warm-up to step 2, allocations at steps 4, 6, 8, the final one at 9, then the mask fixed to step 11."""
STEPS = 12
LR = 5.0
"""SGD rate: high, so that 12 steps from E = 0 move the output well past the tolerance."""


def peft_config(arch: str, **options) -> peft.AdaLoraConfig:
    return peft.AdaLoraConfig(
        target_modules=list(TARGETS[arch]), lora_alpha=8, **{**SCHEDULE, "total_step": STEPS, **options}
    )


def our_config(arch: str, **options) -> deltatune.AdaLoraConfig:
    return deltatune.AdaLoraConfig(target_modules=list(TARGETS[arch]), lora_alpha=8, **{**SCHEDULE, **options})


def peft_model(arch: str, base: torch.nn.Module, **options) -> peft.PeftModel:
    return peft.get_peft_model(copy.deepcopy(base), peft_config(arch, **options))


def shrink(parameters) -> None:
    """Halve random N(0, 1) factors (`init_lora_weights=False`; ΔW, a product of three, by 8): T5's unscaled
    attention otherwise turns float32 rounding into differences above the tolerance (3e-5 at outputs of 3.5)."""
    with torch.no_grad():
        for parameter in parameters:
            parameter.mul_(0.5)


def random_peft_model(arch: str, base: torch.nn.Module) -> peft.PeftModel:
    theirs = peft_model(arch, base, init_lora_weights=False).eval()
    shrink(p for n, p in theirs.named_parameters() if "lora_" in n)
    return theirs


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_changed(actual: torch.Tensor, reference: torch.Tensor) -> None:
    assert (actual - reference).abs().max().item() > 1e-3


def svd_layers(delta_model: deltatune.DeltaModel, name: str = "default") -> dict[str, SvdLinear]:
    return {module: site.adapters[name] for module, site in delta_model.sites() if name in site.adapters}


# ----------------------------------------------------------------------------- same weights, same outputs
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_folder_loads_with_peft_outputs(arch: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = random_peft_model(arch, base)
    theirs.save_pretrained(str(tmp_path))
    expected = run(theirs, arch)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    assert_close(run(ours, arch), expected)
    assert_changed(expected, run(base, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_our_peft_folder_loads_in_peft_with_our_outputs(arch: str, tmp_path: Path) -> None:
    base = build(arch)
    ours = deltatune.attach(copy.deepcopy(base), our_config(arch, init_lora_weights=False)).eval()
    shrink(ours.adapter_parameters("default"))
    expected = run(ours, arch)
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert_close(run(theirs, arch), expected)
    assert_changed(expected, run(base, arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_weights_equal_peft_merged(arch: str, tmp_path: Path) -> None:
    base = build(arch)
    theirs = random_peft_model(arch, base)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    expected = run(theirs.merge_and_unload(), arch)
    assert_close(run(ours.unload(merge=True), arch), expected)


def test_at_init_the_model_equals_the_base_as_with_peft() -> None:
    base = build("llama")
    ours = deltatune.attach(copy.deepcopy(base), our_config("llama"))
    theirs = peft_model("llama", base).eval()
    assert torch.equal(run(ours, "llama"), run(base, "llama"))
    assert torch.equal(run(theirs, "llama"), run(base, "llama"))
    layer = next(iter(svd_layers(ours).values()))
    assert torch.count_nonzero(layer.lora_E) == 0
    assert 0.015 < layer.lora_A.std().item() < 0.025 and 0.015 < layer.lora_B.std().item() < 0.025


# ----------------------------------------------------------------------------- the rank budget
def peft_training(arch: str, base: torch.nn.Module, folder: Path) -> peft.PeftModel:
    """peft's AdaLoRA trained `STEPS` SGD steps on a fixed loss sequence (the forward of its causal-LM
    model adds the orthogonality term to the loss), with `update_and_allocate` after every step; saved in
    `folder`."""
    theirs = peft_model(arch, base, task_type="CAUSAL_LM")
    theirs.save_pretrained(str(folder / "initial"))
    optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        inputs = token_inputs(100 + step)
        theirs(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    theirs.save_pretrained(str(folder / "trained"))
    return theirs.eval()


def our_training(arch: str, base: torch.nn.Module, initial: Path) -> deltatune.DeltaModel:
    """Ours from peft's initial weights, driven by the same losses and steps (the regulariser added by hand)."""
    ours = deltatune.load(copy.deepcopy(base), str(initial), trainable=True)
    allocator = deltatune.RankAllocator(ours)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        inputs = token_inputs(100 + step)
        (ours(**inputs, labels=inputs["input_ids"]).loss + allocator.orthogonal_loss()).backward()
        optimizer.step()
        allocator.update_and_allocate(step)
        optimizer.zero_grad()
    return ours.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained_pair(request, tmp_path_factory) -> tuple[str, torch.nn.Module, peft.PeftModel, deltatune.DeltaModel, Path]:
    arch = request.param
    folder = tmp_path_factory.mktemp(f"adalora-{arch}")
    base = build(arch)
    theirs = peft_training(arch, base, folder)
    ours = our_training(arch, base, folder / "initial")
    return arch, base, theirs, ours, folder


def test_rank_pattern_after_tfinal_equals_peft(trained_pair) -> None:
    arch, _, theirs, ours, _ = trained_pair
    expected = {
        key.removesuffix(".default").removesuffix(".lora_E"): kept
        for key, kept in theirs.peft_config["default"].rank_pattern.items()
    }
    pattern = ours.configs["default"].rank_pattern
    assert pattern == expected
    assert sum(map(sum, pattern.values())) == SCHEDULE["target_r"] * len(pattern)
    assert len({tuple(kept) for kept in pattern.values()}) > 1, "every module kept the same triplets: a weak test"


def test_parameters_after_the_schedule_equal_peft(trained_pair) -> None:
    arch, _, theirs, ours, _ = trained_pair
    peft_parameters = dict(theirs.base_model.model.named_parameters())
    for module_name, layer in svd_layers(ours).items():
        for factor in ("lora_A", "lora_B", "lora_E"):
            expected = peft_parameters[f"{module_name}.{factor}.default"]
            torch.testing.assert_close(
                getattr(layer, factor), expected, atol=ATOL, rtol=0, msg=f"{module_name}.{factor}"
            )
        masked = ~torch.tensor(ours.configs["default"].rank_pattern[module_name])
        assert torch.count_nonzero(layer.lora_E[masked]) == 0


def test_folders_saved_after_allocation_hold_the_same_pruned_tensors(trained_pair, tmp_path: Path) -> None:
    arch, _, _, ours, folder = trained_pair
    ours.save(str(tmp_path), format="peft")
    expected, saved = (load_file(str(f / "adapter_model.safetensors")) for f in (folder / "trained", tmp_path))
    assert saved.keys() == expected.keys()
    for key in expected:
        assert saved[key].shape == expected[key].shape, key
        torch.testing.assert_close(saved[key], expected[key], atol=ATOL, rtol=0, msg=key)
    kept = [expected[key].shape[0] for key in expected if key.endswith("lora_E")]
    assert sum(kept) == SCHEDULE["target_r"] * len(kept) and len(set(kept)) > 1
    peft_pattern = json.loads((folder / "trained" / "adapter_config.json").read_text())["rank_pattern"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == peft_pattern


def test_pruned_folders_load_across_with_the_same_outputs(trained_pair, tmp_path: Path) -> None:
    arch, base, theirs, ours, folder = trained_pair
    expected = run(theirs, arch)
    assert_changed(expected, run(base, arch))
    from_peft = deltatune.load(copy.deepcopy(base), str(folder / "trained")).eval()
    assert_close(run(from_peft, arch), expected)
    ranks = [layer.rank for layer in svd_layers(from_peft).values()]
    assert sum(ranks) == SCHEDULE["target_r"] * len(ranks)
    ours.save(str(tmp_path / "peft"), format="peft")
    ours.save(str(tmp_path / "ours"))
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert_close(run(in_peft, arch), run(ours, arch))
    reloaded = deltatune.load(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(run(reloaded, arch), run(ours, arch), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the allocator's rules
def test_a_missing_total_step_is_a_clear_error() -> None:
    ours = deltatune.attach(build("llama"), our_config("llama", total_step=None))
    with pytest.raises(DeltaTuneError, match="total_step"):
        deltatune.RankAllocator(ours)


def test_a_schedule_without_a_budgeting_phase_is_refused() -> None:
    with pytest.raises(DeltaTuneError, match="no budgeting phase"):
        our_config("llama", tinit=8, tfinal=4, total_step=12)


def test_the_allocator_needs_the_gradients_of_the_step() -> None:
    ours = deltatune.attach(build("llama"), our_config("llama"))
    with pytest.raises(DeltaTuneError, match="after backward"):
        deltatune.RankAllocator(ours).update_and_allocate(0)


def test_every_peft_adalora_key_is_read_tolerated_or_refused() -> None:
    from deltatune import peft_keys

    classes = [
        set(peft_keys.COMMON_TOLERATED),
        set(peft_keys.ADALORA_READ),
        set(peft_keys.ADALORA_TOLERATED),
        set(peft_keys.ADALORA_REFUSED),
    ]
    unclassified = {field.name for field in dataclasses.fields(peft.AdaLoraConfig)} - set().union(*classes)
    assert not unclassified, f"classify these peft keys in deltatune.peft_keys: {sorted(unclassified)}"
    assert sum(map(len, classes)) == len(set().union(*classes)), "a key is in two classes"


def test_a_peft_adalora_folder_with_a_refused_key_is_refused(tmp_path: Path) -> None:
    theirs = peft_model("llama", build("llama"))
    theirs.save_pretrained(str(tmp_path))
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "bias": "all"}))
    with pytest.raises(DeltaTuneError, match="bias='all'"):
        deltatune.load(build("llama"), str(tmp_path))


# ----------------------------------------------------------------------------- deltatune train
ADAPTER = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "target_modules": "all-linear"}
"""With max_steps 8: warm-up to step 1, allocations at 2-5, the final one at 6, the mask fixed at 7."""


def test_deltatune_train_trains_adalora_and_ends_with_a_rank_pattern(tmp_path: Path) -> None:
    from training_fixtures import task_config

    config = task_config(tmp_path, "causal-lm", ADAPTER, max_steps=8, eval_file=None, learning_rate=0.05)
    assert main(["train", str(config), "--quiet"]) == 0
    out = tmp_path / "out"
    losses = [entry["loss"] for entry in json.loads((out / "metrics.json").read_text())["history"] if "loss" in entry]
    assert losses[-1] < losses[0]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())["config"]
    assert saved["total_step"] == 8
    pattern = saved["rank_pattern"]
    assert pattern and sum(map(sum, pattern.values())) == ADAPTER["target_r"] * len(pattern)
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(tensors[f"{module}.lora_E"].shape[0] == sum(kept) for module, kept in pattern.items())


def test_resume_of_an_adalora_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    from training_fixtures import task_config

    config = task_config(
        tmp_path, "causal-lm", {**ADAPTER, "lora_dropout": 0.1}, max_steps=8, save_every=3, eval_file=None
    )
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)
    step_state = load_file(str(tmp_path / "cut" / "checkpoints" / "step-000003" / "step_state.safetensors"))
    assert any(key.startswith("default.smoothed.") for key in step_state)
    assert any(key.startswith("default.kept.") for key in step_state)


def test_a_resume_after_adaloras_recommended_adapter_settings_changed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from training_fixtures import task_config

    row = DEFAULTS["adalora"]
    field = next(iter(row.adapter))  # the row's first adapter setting, which ADAPTER leaves to it
    config = task_config(tmp_path, "causal-lm", ADAPTER, max_steps=8, save_every=3, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 0
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["config"]
    assert saved[field] == row.adapter[field]
    monkeypatch.setitem(DEFAULTS, "adalora", dataclasses.replace(row, adapter={field: row.adapter[field] * 2 + 1}))
    assert main(["train", str(config), "--quiet", "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("deltatune: --resume: ") and field in line, line


def test_an_allocator_on_a_pruned_adapter_is_refused(tmp_path: Path) -> None:
    pattern = {"model.layers.0.self_attn.q_proj": [True, False, True, False]}
    ours = deltatune.attach(build("llama"), our_config("llama", rank_pattern=pattern))
    assert svd_layers(ours)["model.layers.0.self_attn.q_proj"].rank == 2
    with pytest.raises(DeltaTuneError, match="pruned by an earlier budget"):
        deltatune.RankAllocator(ours)


def test_a_peft_save_without_total_step_is_a_clear_error_and_writes_nothing(tmp_path: Path) -> None:
    ours = deltatune.attach(build("llama"), our_config("llama", total_step=None))
    with pytest.raises(DeltaTuneError, match="needs total_step"):
        ours.save(str(tmp_path / "adapter"), format="peft")
    assert not (tmp_path / "adapter").exists()
