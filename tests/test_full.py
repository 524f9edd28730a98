"""Full fine-tuning (`method: full`): every base parameter trains in place, as plain PyTorch full
fine-tuning does (the reference below: the same AdamW steps on the bare model); the folder holds the
whole model's weights under their own names; merging is the identity; what needs the untouched base
is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.errors import DeltaTuneError
from deltatune.site import site_of
from tiny_models import build, run
from training_fixtures import task_config


def _steps(model: torch.nn.Module, arch: str, parameters: list[torch.nn.Parameter], count: int = 3) -> None:
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for step in range(count):
        run(model, arch, seed=10 + step).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "mlp"])
def test_training_equals_plain_full_fine_tuning_of_the_bare_model(arch: str) -> None:
    reference = build(arch)
    tuned = deltatune.attach(copy.deepcopy(reference), deltatune.FullConfig())
    _steps(reference, arch, list(reference.parameters()))
    _steps(tuned, arch, [p for p in tuned.parameters() if p.requires_grad])
    expected = dict(reference.named_parameters())
    assert {n: p for n, p in tuned.base_model.named_parameters()}.keys() == expected.keys()
    for name, parameter in tuned.base_model.named_parameters():
        assert torch.equal(parameter, expected[name]), name
    assert torch.equal(run(tuned, arch), run(reference, arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_every_base_parameter_trains_and_is_saved_once_under_its_own_name(arch: str, tmp_path: Path) -> None:
    model = build(arch)
    own = dict(model.named_parameters())  # each tensor once: a head tied to the embedding under its first name
    delta_model = deltatune.attach(model, deltatune.FullConfig())
    assert {id(p) for p in delta_model.adapter_parameters("default")} == {id(p) for p in own.values()}
    assert all(p.requires_grad for p in own.values())
    summary = delta_model.trainable_summary()
    assert summary.trainable == summary.total == sum(p.numel() for p in own.values())
    assert "deltatune" not in " ".join(delta_model.base_model.state_dict())  # no tensor registered twice
    delta_model.save(tmp_path / "full")
    saved = load_file(tmp_path / "full" / "adapter_model.safetensors")
    assert saved.keys() == own.keys()
    assert all(torch.equal(saved[name], parameter.detach()) for name, parameter in own.items())


def test_merge_is_the_identity_and_unload_gives_the_tuned_model() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.FullConfig())
    _steps(delta_model, "llama", [p for p in delta_model.parameters() if p.requires_grad], count=1)
    weights = {n: p.detach().clone() for n, p in delta_model.base_model.named_parameters()}
    expected = run(delta_model, "llama").detach()
    delta_model.merge()
    assert all(torch.equal(p, weights[n]) for n, p in delta_model.base_model.named_parameters())
    delta_model.unmerge()
    plain = delta_model.unload()
    assert all(torch.equal(p, weights[n]) for n, p in plain.named_parameters())
    assert all(p.requires_grad for p in plain.parameters())  # the flags a fresh model had before attach
    assert torch.equal(run(plain, "llama"), expected)


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda model: model.disabled().__enter__(), "disabled() needs the base model"),
        (lambda model: run(model, "llama", adapter_names=["default", None, None]), "a mixed batch"),
        (lambda model: model.unload(merge=False), "unload(merge=False) needs the base model"),
        (lambda model: model.add("again", deltatune.FullConfig()), "one full fine-tuning adapter"),
        (lambda model: model.save("unused", format="peft"), "peft has no 'full' method"),
        (lambda model: model.delete("default"), "delete('default') needs the base model"),
        (
            lambda model: model.add("lora", deltatune.LoraConfig(r=2, target_modules=["q_proj"])).activate("lora"),
            "activating adapters without 'default' needs the base model",
        ),
    ],
    ids=["disabled", "mixed-batch", "unload-unmerged", "second-full", "peft-format", "delete", "activate-without"],
)
def test_what_needs_the_untouched_base_is_refused_in_one_line(action, message: str) -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.FullConfig())
    with pytest.raises(DeltaTuneError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        action(delta_model)
    assert "\n" not in str(caught.value)
    assert list(delta_model.configs)[0] == "default" and delta_model.active_adapters == ("default",)


def test_another_adapter_trains_on_top_of_the_tuned_weights_beside_full() -> None:
    """The tuned weights are the base of anything added after: both active compute as the LoRA alone
    on the tuned model."""
    delta_model = deltatune.attach(build("llama"), deltatune.FullConfig())
    _steps(delta_model, "llama", [p for p in delta_model.parameters() if p.requires_grad], count=1)
    expected = run(delta_model, "llama").detach()
    delta_model.add("lora", deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    assert torch.equal(run(delta_model.activate("default", "lora"), "llama").detach(), expected)


def test_modules_to_save_is_refused() -> None:
    with pytest.raises(DeltaTuneError, match="trains every module in place"):
        deltatune.FullConfig(modules_to_save=["classifier"])


def test_a_quantized_base_is_refused() -> None:
    pytest.importorskip("bitsandbytes", reason="the quantized base needs bitsandbytes")
    from tiny_models import llama_nf4

    model = llama_nf4()
    with pytest.raises(DeltaTuneError, match="full fine-tuning cannot train .* quantized layer"):
        deltatune.attach(model, deltatune.FullConfig())
    assert site_of(model.model.layers[0].self_attn.q_proj) is None


def test_the_trainer_trains_the_head_in_place_and_the_folder_loads_back(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from deltatune.train import train
    from deltatune.train.cli import main
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import prepare_run

    config = TrainConfig.from_yaml(task_config(tmp_path, "seq-cls", {"method": "full"}, max_steps=3))
    result = train(config, progress=False)
    trained = result.run.delta_model.eval()
    head = trained.base_model.score
    assert head.weight.requires_grad and list(site_of(head).adapters) == ["default"]  # no modules_to_save copy
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    loaded = prepare_run(config, adapter=str(result.output_dir / "adapter")).delta_model.eval()
    batch = {"input_ids": torch.tensor([[1, 12, 13, 14, 15]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained(**batch).logits)
    # merged: a plain transformers folder of the tuned model
    assert main(["merge", config.model, str(result.output_dir / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trained(**batch).logits, atol=1e-6, rtol=0)


def test_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run

    config = task_config(tmp_path, "causal-lm", **{**RESUME_SETTINGS, "adapter": {"method": "full"}})
    assert_resume_equals_the_uninterrupted_run(config, tmp_path)


def test_a_strict_load_refused_for_another_base_leaves_every_base_weight_as_it_was(tmp_path: Path) -> None:
    """The base fingerprint is checked before any weight is copied: a `full` adapter's weights are the
    base's own, and deleting the refused adapter could not bring the old ones back."""
    trained = deltatune.attach(build("llama"), deltatune.FullConfig())
    with torch.no_grad():
        for parameter in trained.adapter_parameters("default"):
            parameter.add_(0.5 * torch.randn_like(parameter))
    trained.save(str(tmp_path / "full"))
    other = build("llama", seed=1)
    before = {name: parameter.detach().clone() for name, parameter in other.named_parameters()}
    with pytest.raises(deltatune.BaseWeightsError, match="nothing was loaded"):
        deltatune.load(other, str(tmp_path / "full"), strict=True)
    changed = [name for name, parameter in other.named_parameters() if not torch.equal(parameter, before[name])]
    assert changed == []


def test_a_folder_whose_other_adapter_fails_to_load_leaves_every_base_weight_as_it_was(tmp_path: Path) -> None:
    """A full fine-tuning adapter loads after the folder's other adapters, so one of them failing comes
    before the tuned weights are copied into the base (which no removal could take back)."""
    from safetensors.torch import save_file

    trained = deltatune.attach(build("llama"), deltatune.FullConfig(), name="a_full")
    with torch.no_grad():
        for parameter in trained.adapter_parameters("a_full"):
            parameter.add_(0.5 * torch.randn_like(parameter))
    trained.add("b_lora", deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    trained.save(str(tmp_path / "both"))
    (weights_file,) = (tmp_path / "both" / "b_lora").glob("*.safetensors")
    save_file({key: tensor[..., :1].contiguous() for key, tensor in load_file(weights_file).items()}, weights_file)
    other = build("llama")
    before = {name: parameter.detach().clone() for name, parameter in other.named_parameters()}
    with pytest.raises(deltatune.errors.AdapterShapeError, match="lora_A: the file holds shape"):
        deltatune.load(other, str(tmp_path / "both"))
    changed = [name for name, parameter in other.named_parameters() if not torch.equal(parameter, before[name])]
    assert changed == []


def _two_full_adapters(folder: Path) -> None:
    """A folder of two full fine-tuning adapters, a/ and b/, each with tuned weights."""
    for name in ("a", "b"):
        trained = deltatune.attach(build("llama"), deltatune.FullConfig(), name=name)
        with torch.no_grad():
            for parameter in trained.adapter_parameters(name):
                parameter.add_(0.5 * torch.randn_like(parameter))
        trained.save(str(folder / name))


def _every_tensor(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of `model`, under each of their names."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: tensor.detach().clone() for name, tensor in tensors}


ONTO = {
    "plain-model": lambda model: model,
    "model-with-a-lora": lambda model: deltatune.attach(model, deltatune.LoraConfig(r=2, target_modules=["q_proj"])),
}
"""What the folder of two full adapters is loaded onto, built from the plain model."""


@pytest.mark.parametrize("onto", list(ONTO))
def test_a_refused_load_of_two_full_adapters_leaves_every_parameter_and_buffer_bit_identical(
    tmp_path: Path, onto: str
) -> None:
    """Each full adapter copies its weights into the base, which no removal can take back: a folder that would
    give the model a second one is refused before the first is copied."""
    _two_full_adapters(tmp_path / "two")
    model = build("llama")
    target = ONTO[onto](model)
    adapters = list(getattr(target, "configs", {}))
    before = _every_tensor(model)
    with pytest.raises(DeltaTuneError, match="second full fine-tuning adapter") as caught:
        deltatune.load(target, str(tmp_path / "two"))
    assert "\n" not in str(caught.value) and "nothing was loaded" in str(caught.value)
    assert f"{tmp_path / 'two' / 'a'}, {tmp_path / 'two' / 'b'}" in str(caught.value)
    after = _every_tensor(model)
    assert after.keys() == before.keys()
    assert [name for name in before if not torch.equal(after[name], before[name])] == []
    assert list(getattr(target, "configs", {})) == adapters


def test_a_full_adapter_loaded_onto_a_model_holding_one_is_refused_before_anything_loads(tmp_path: Path) -> None:
    _two_full_adapters(tmp_path / "two")
    delta_model = deltatune.load(build("llama"), str(tmp_path / "two" / "a"))
    before = _every_tensor(delta_model.base_model)
    with pytest.raises(DeltaTuneError, match="second full fine-tuning adapter.*'a' on the model"):
        deltatune.load(delta_model, str(tmp_path / "two" / "b"), name="b")
    after = _every_tensor(delta_model.base_model)
    assert [name for name in before if not torch.equal(after[name], before[name])] == []
    assert list(delta_model.configs) == ["a"]
