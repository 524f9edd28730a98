"""The peft-named methods trainers call on a `DeltaModel` mean what peft's do: `save_pretrained` writes the
adapter folder (never the full model), `disable_adapter` computes as the base model, `get_base_model` is the
wrapped model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.errors import CheckpointMismatchError
from test_invariants import CASES, attached
from tiny_models import build, run


def _trained_lora() -> deltatune.DeltaModel:
    delta_model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(parameter.numel()))
    return delta_model


@pytest.mark.parametrize("format", ["deltatune", "peft"])
def test_save_pretrained_writes_the_adapter_folder_not_the_model(tmp_path: Path, format: str) -> None:
    delta_model = _trained_lora()
    delta_model.save_pretrained(tmp_path / "adapter", format=format)
    assert sorted(entry.name for entry in (tmp_path / "adapter").iterdir()) == [
        "README.md",  # the model card every save writes
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = deltatune.load(build("llama"), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, "llama"), run(delta_model, "llama"), atol=1e-5, rtol=0)


def test_save_pretrained_in_peft_format_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    delta_model = _trained_lora()
    delta_model.save_pretrained(tmp_path / "adapter", format="peft")
    peft_model = PeftModel.from_pretrained(build("llama"), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(run(peft_model, "llama"), run(delta_model, "llama"), atol=1e-5, rtol=0)


def test_save_pretrained_selected_adapters_and_non_writing_rank(tmp_path: Path) -> None:
    delta_model = _trained_lora()
    delta_model.add("other", deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    delta_model.save_pretrained(tmp_path / "nothing", is_main_process=False)
    assert not (tmp_path / "nothing").exists()
    delta_model.save_pretrained(tmp_path / "both")
    assert sorted(entry.name for entry in (tmp_path / "both").iterdir()) == ["default", "other"]
    delta_model.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    loaded = deltatune.load(build("llama"), str(tmp_path / "one"))
    assert [config.r for config in loaded.configs.values()] == [2]


def test_disable_adapter_computes_as_the_base_model() -> None:
    delta_model = _trained_lora()
    assert delta_model.get_base_model() is delta_model.base_model
    with torch.no_grad():
        base = run(build("llama"), "llama")
        assert not torch.allclose(run(delta_model, "llama"), base)
        with delta_model.disable_adapter():
            torch.testing.assert_close(run(delta_model, "llama"), base, atol=0, rtol=0)
        assert not torch.allclose(run(delta_model, "llama"), base)


def _adapter_gradients(checkpointing: dict | None) -> list[torch.Tensor]:
    delta_model = _trained_lora().train()
    if checkpointing is not None:
        delta_model.gradient_checkpointing_enable(checkpointing)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    delta_model(input_ids=ids, labels=ids).loss.backward()
    return [parameter.grad for parameter in delta_model.adapter_parameters("default")]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_keeps_the_adapter_gradients(use_reentrant: bool) -> None:
    """Frozen embeddings: reentrant checkpointing passes gradients only because their output is made to
    require them (on transformers 4.57 the backward raised without it)."""
    expected = _adapter_gradients(None)
    actual = _adapter_gradients({"use_reentrant": use_reentrant})
    assert len(actual) == len(expected) == 28 and all(gradient is not None for gradient in actual)
    for gradient, reference in zip(actual, expected):
        torch.testing.assert_close(gradient, reference, atol=1e-6, rtol=0)


def test_adapter_trainer_refuses_an_unknown_format() -> None:
    from transformers import Trainer

    with pytest.raises(deltatune.DeltaTuneError, match="unknown adapter format 'safetensors'"):
        deltatune.adapter_trainer(Trainer, format="safetensors")
    assert deltatune.adapter_trainer(Trainer, format="peft").adapter_format == "peft"


def test_restore_weights_copies_saved_adapters_back_in_place(tmp_path: Path) -> None:
    """What a resumed trainer does: the saved weights come back into the same parameter objects."""
    from deltatune.restore import restore_weights

    delta_model = _trained_lora()
    delta_model.add("other", deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    delta_model.save_pretrained(tmp_path / "both")
    delta_model.save_pretrained(tmp_path / "peft-one", selected_adapters=["default"], format="peft")
    saved = {name: p.detach().clone() for name, p in delta_model.named_parameters() if p.requires_grad}
    parameters = {name: p for name, p in delta_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for parameter in parameters.values():
            parameter.add_(1.0)
    restore_weights(delta_model, tmp_path / "both")
    assert all(torch.equal(p, saved[name]) for name, p in delta_model.named_parameters() if p.requires_grad)
    assert all(p is parameters[name] for name, p in delta_model.named_parameters() if p.requires_grad)
    with pytest.raises(deltatune.AdapterFileError, match="does not record its name"):  # peft's folder names none
        restore_weights(delta_model, tmp_path / "peft-one")


CHECKPOINT_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
"""A LoRA every checkpoint format writes (AdapterHub's adapts the attention matrices only)."""


def _lora_checkpoint(tmp_path: Path, format: str, seed: int = 0, **settings) -> tuple[deltatune.DeltaModel, Path]:
    """A LoRA on the tiny Llama of `seed`, its weights moved off their start, saved as `format` (a trainer's
    checkpoint folder)."""
    config = deltatune.LoraConfig(**{**CHECKPOINT_LORA, **settings})
    delta_model = deltatune.attach(build("llama", seed), config)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(parameter.numel()))
    delta_model.save_pretrained(tmp_path / "checkpoint-2", format=format)
    return delta_model, tmp_path / "checkpoint-2"


OTHER_SETTINGS = {
    "lora_alpha": ({"lora_alpha": 64}, "lora_alpha: 8 → 64", "alpha: 8 → 64"),
    "use_rslora": ({"use_rslora": True}, "use_rslora: false → true", None),
    "lora_dropout": ({"lora_dropout": 0.1}, "lora_dropout: 0.0 → 0.1", "dropout: 0.0 → 0.1"),
}
"""Settings that leave every tensor name and shape alone but change what training computes: (the change, how
the refusal names it, how it names it in AdapterHub's terms, which its folder records; None: not recorded)."""


@pytest.mark.parametrize("format", ["deltatune", "peft", "adapterhub"])
@pytest.mark.parametrize("changed", list(OTHER_SETTINGS))
def test_restoring_a_checkpoint_refuses_an_adapter_of_other_settings_and_copies_nothing(
    tmp_path: Path, format: str, changed: str
) -> None:
    """A trainer resuming from a checkpoint with another adapter config would continue another run."""
    from deltatune.restore import restore_weights

    settings, described, adapterhub_described = OTHER_SETTINGS[changed]
    if format == "adapterhub":
        if adapterhub_described is None:
            pytest.skip("AdapterHub's LoRA folders have no rsLoRA scaling to record")
        described = adapterhub_described
    _, checkpoint = _lora_checkpoint(tmp_path, format)
    resuming = deltatune.attach(build("llama"), deltatune.LoraConfig(**{**CHECKPOINT_LORA, **settings}))
    before = {name: p.detach().clone() for name, p in resuming.named_parameters()}
    with pytest.raises(CheckpointMismatchError, match="other settings") as error:
        restore_weights(resuming, checkpoint)
    assert described in str(error.value) and str(checkpoint) in str(error.value) and "\n" not in str(error.value)
    assert all(torch.equal(p, before[name]) for name, p in resuming.named_parameters())


@pytest.mark.parametrize("format", ["deltatune", "peft", "adapterhub"])
def test_restoring_a_checkpoint_into_the_adapter_that_wrote_it_is_accepted_in_every_format(
    tmp_path: Path, format: str
) -> None:
    """The settings are compared as the format records them: peft's folder lists the modules `all-linear`
    matched, not the pattern, and the run's own adapter must still resume from it."""
    from deltatune.restore import restore_weights

    targets = "all-linear" if format != "adapterhub" else CHECKPOINT_LORA["target_modules"]
    trained, checkpoint = _lora_checkpoint(tmp_path, format, target_modules=targets, lora_dropout=0.05)
    resuming = deltatune.attach(
        build("llama"), deltatune.LoraConfig(**{**CHECKPOINT_LORA, "target_modules": targets, "lora_dropout": 0.05})
    )
    restore_weights(resuming, checkpoint)
    expected = {name: p for name, p in trained.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, expected[name]) for name, p in resuming.named_parameters() if p.requires_grad)


def test_restoring_a_checkpoint_refuses_one_trained_on_other_base_weights(tmp_path: Path) -> None:
    from deltatune.restore import restore_weights

    _, checkpoint = _lora_checkpoint(tmp_path, "deltatune", seed=0)
    resuming = deltatune.attach(build("llama", seed=1), deltatune.LoraConfig(**CHECKPOINT_LORA))
    before = {name: p.detach().clone() for name, p in resuming.named_parameters()}
    with pytest.raises(deltatune.BaseWeightsError, match="trained on other base weights"):
        restore_weights(resuming, checkpoint)
    assert all(torch.equal(p, before[name]) for name, p in resuming.named_parameters())


def test_restoring_a_checkpoint_refuses_an_adapter_of_another_method(tmp_path: Path) -> None:
    from deltatune.restore import restore_weights

    _, checkpoint = _lora_checkpoint(tmp_path, "deltatune")
    resuming = deltatune.attach(build("llama"), deltatune.IA3Config(target_modules=CHECKPOINT_LORA["target_modules"]))
    with pytest.raises(CheckpointMismatchError, match='method: "lora" → "ia3"'):
        restore_weights(resuming, checkpoint)


def _every_method_in(formats: tuple[str, ...]) -> list:
    """(invariant case, format) for every format that case's method is written in."""
    from deltatune.peft_format import codec_of_method

    return [
        pytest.param(case, format, id=f"{case}-{format}")
        for case in CASES
        if CASES[case].archs  # fusion has its own tests, on adapters of others
        for format in formats
        if format != "peft" or codec_of_method(CASES[case].config(CASES[case].archs[0]).method) is not None
    ]


NOT_RESUMABLE = {
    ("p_tuning", "peft"): "source.embedding.weight",
    ("prefix_tuning", "peft"): "source.embedding.weight",
    ("reft", "adapterhub"): "projection.signs",
}
"""Folders training cannot resume from, and the first tensor each lacks: peft keeps the prompt a prompt encoder
computes (P-tuning's encoder, the invariant table's prefix-tuning MLP), not the encoder; AdapterHub's ReFT folder
writes the signs over the diagonal of the reflectors' matrix. A trainer writes such checkpoints in deltatune's
format."""
FORMATS = ("deltatune", "peft", "adapterhub")


@pytest.mark.parametrize("method,format", _every_method_in(FORMATS))
def test_every_method_restores_the_checkpoint_its_own_run_wrote(tmp_path: Path, method: str, format: str) -> None:
    """No method's settings read back otherwise than they were written (the check must not refuse a true resume);
    a folder that keeps less than training changes is refused, naming what it lacks, and changes nothing."""
    from deltatune.restore import restore_weights

    arch = CASES[method].archs[0]
    trained = attached(method, arch)
    try:
        trained.save_pretrained(tmp_path / "checkpoint-2", format=format)
    except deltatune.DeltaTuneError as error:  # this case's settings have no such folder, so no such checkpoint
        pytest.skip(f"not written as {format}: {error}")
    resuming = deltatune.attach(build(arch), CASES[method].config(arch))
    if (method, format) in NOT_RESUMABLE:
        before = {name: p.detach().clone() for name, p in resuming.named_parameters()}
        with pytest.raises(CheckpointMismatchError, match="keeps less of adapter 'default'") as error:
            restore_weights(resuming, tmp_path / "checkpoint-2")
        said = str(error.value)
        assert NOT_RESUMABLE[method, format] in said and "deltatune's format" in said and "\n" not in said, said
        assert all(torch.equal(p, before[name]) for name, p in resuming.named_parameters())
        return
    restore_weights(resuming, tmp_path / "checkpoint-2")
    expected = dict(trained.named_parameters())
    assert all(torch.equal(p, expected[name]) for name, p in resuming.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method,format", _every_method_in(FORMATS))
def test_a_trainer_checkpoint_keeps_its_format_exactly_where_that_format_keeps_the_adapter_whole(
    method: str, format: str
) -> None:
    """What a trainer's checkpoint is written in (`restore.lost_in`): the trainer's format for every adapter it
    keeps whole, deltatune's for the folders a restore refuses."""
    from deltatune.restore import lost_in

    trained = attached(method, CASES[method].archs[0])
    try:
        lost = lost_in(trained, format)
    except deltatune.DeltaTuneError as error:
        pytest.skip(f"not written as {format}: {error}")
    assert bool(lost) == ((method, format) in NOT_RESUMABLE), lost
