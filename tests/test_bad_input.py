"""Bad input is refused with an error that names the problem and the fix, and leaves nothing behind:
no half-written file on disk, no half-attached adapter on the model, requires_grad flags as they were."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as real_save_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
import deltatune.atomic
from deltatune.site import DeltaSite
from tiny_models import build, run

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# ----------------------------------------------------------------------------- helpers
def llama_48() -> torch.nn.Module:
    """The tiny Llama of tiny_models with hidden size 48 instead of 32 (same layer names)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def grad_flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


def has_sites(model: torch.nn.Module) -> bool:
    return any(isinstance(module, DeltaSite) for module in model.modules())


def mixed_flags_llama() -> torch.nn.Module:
    """A tiny Llama whose requires_grad flags are not all alike, so "restored" is a real check."""
    model = build("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)
    return model


def lora(**changes) -> deltatune.LoraConfig:
    settings = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    settings.update(changes)
    return deltatune.LoraConfig(**settings)


@pytest.fixture
def saved_adapter(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A good LoRA adapter folder for the tiny Llama, and the adapted model's output."""
    delta_model = deltatune.attach(build("llama"), lora())
    expected = run(delta_model, "llama").detach()
    folder = tmp_path / "good"
    delta_model.save(str(folder))
    return folder, expected


def assert_clean_plain(model: torch.nn.Module, flags_before: dict[str, bool]) -> None:
    assert not has_sites(model), "a failed call left a deltatune site on the model"
    assert grad_flags(model) == flags_before, "a failed call changed requires_grad flags"


def no_temp_files(folder: Path) -> list[str]:
    """Leftovers of an interrupted save: in the folder, or staging folders beside it."""
    inside = os.listdir(folder) if folder.exists() else []
    beside = [name for name in os.listdir(folder.parent) if name.startswith(f".{folder.name}.")]
    return [name for name in inside if name.endswith((".tmp", ".partial")) or name.startswith(".")] + beside


# ----------------------------------------------------------------------------- targeting
def test_target_entry_that_matches_nothing_lists_close_names() -> None:
    model = mixed_flags_llama()
    before = grad_flags(model)
    with pytest.raises(deltatune.TargetNotFoundError, match=r"'q_prj'.*matches no module.*q_proj"):
        deltatune.attach(model, deltatune.LoraConfig(target_modules=["q_prj", "v_proj"]))
    assert_clean_plain(model, before)


def test_target_that_matches_nothing_on_an_existing_delta_model_keeps_it_as_it_was() -> None:
    delta_model = deltatune.attach(build("llama"), lora())
    expected = run(delta_model, "llama").detach()
    trainable = grad_flags(delta_model)
    with pytest.raises(deltatune.TargetNotFoundError, match="q_proj"):
        delta_model.add("second", deltatune.LoraConfig(target_modules=["q_prj"]))
    assert list(delta_model.configs) == ["default"]
    assert delta_model.active_adapters == ("default",)
    assert all(list(site.adapters) == ["default"] for _, site in delta_model.sites())
    assert grad_flags(delta_model) == trainable
    assert torch.equal(run(delta_model, "llama"), expected)


def test_non_leaf_target_suggests_a_leaf_name() -> None:
    model = mixed_flags_llama()
    before = grad_flags(model)
    with pytest.raises(
        deltatune.UnsupportedModuleError, match=r"cannot adapt 'model\.layers\.0\.mlp'.*LlamaMLP.*gate_proj"
    ):
        deltatune.attach(model, deltatune.LoraConfig(target_modules=["mlp"]))
    assert_clean_plain(model, before)


def test_bitfit_on_llama_without_biases_mentions_add_missing_bias() -> None:
    model = mixed_flags_llama()
    before = grad_flags(model)
    with pytest.raises(deltatune.DeltaTuneError, match="add_missing_bias=True"):
        deltatune.attach(model, deltatune.BitFitConfig())
    assert_clean_plain(model, before)
    with pytest.raises(
        deltatune.DeltaTuneError, match=r"'model\.layers\.0\.self_attn\.q_proj' has no bias.*add_missing_bias=True"
    ):
        deltatune.attach(model, deltatune.BitFitConfig(target_modules=["q_proj"]))
    assert_clean_plain(model, before)


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": 0}, r"r must be a whole number ≥ 1, got 0"),
        ({"r": -2}, r"r must be a whole number ≥ 1, got -2"),
        (
            {"rank_pattern": {"q_proj": 0}},
            r"rank_pattern must be a mapping of regular expressions to whole numbers ≥ 1",
        ),
        ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\), got 1\.5"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be a number in \[0, 1\)"),
        (
            {"init_lora_weights": "pissa_niter_x"},
            r'init_lora_weights must be true, false, "gaussian", "orthogonal", "pissa", "olora", "eva", "corda", '
            r'"loftq", "mica" or "pissa_niter_<iterations>", got',
        ),
    ],
)
def test_lora_config_values_are_checked_when_the_config_is_made(changes: dict, message: str) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.LoraConfig(**changes)


def test_lora_config_values_are_checked_on_replace() -> None:
    config = deltatune.LoraConfig(r=4)
    with pytest.raises(deltatune.DeltaTuneError, match="r must be a whole number ≥ 1, got 0"):
        config.replace(r=0)


def test_target_modules_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(
        deltatune.DeltaTuneError, match="target_modules must be a list of strings, a regular expression or null"
    ):
        deltatune.LoraConfig(target_modules=["q_proj", 3])


# ----------------------------------------------------------------------------- methods
def test_unknown_method_name_suggests_the_close_one_and_lists_known_ones() -> None:
    with pytest.raises(deltatune.UnknownMethodError, match=r"unknown method 'lorra'\. Did you mean 'lora'") as caught:
        deltatune.get_method("lorra")
    message = str(caught.value)
    assert re.search(r"Known methods: .*bitfit.*lora", message)
    assert "@deltatune.register" in message


def test_config_file_with_unknown_method_is_refused(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    data = json.loads((folder / CONFIG).read_text())
    data["method"] = "nope"
    data["config"]["method"] = "nope"
    (folder / CONFIG).write_text(json.dumps(data))
    model = mixed_flags_llama()
    before = grad_flags(model)
    with pytest.raises(deltatune.UnknownMethodError, match=r"unknown method 'nope'.*Known methods: .*lora"):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


def test_config_file_without_method_key_is_refused(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    data = json.loads((folder / CONFIG).read_text())
    del data["config"]["method"]
    (folder / CONFIG).write_text(json.dumps(data))
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(deltatune.UnknownMethodError, match="no 'method' key"):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


# ----------------------------------------------------------------------------- adapter names
def test_duplicate_adapter_name_is_refused_and_the_first_one_kept() -> None:
    delta_model = deltatune.attach(build("llama"), lora())
    expected = run(delta_model, "llama").detach()
    parameters_before = list(delta_model.adapter_parameters("default"))
    with pytest.raises(
        deltatune.AdapterNameError, match=r"'default' is not free.*taken: \['default'\].*pick another name"
    ):
        delta_model.add("default", lora(r=2))
    assert list(delta_model.configs) == ["default"]
    assert delta_model.configs["default"].r == 4
    assert [id(p) for p in delta_model.adapter_parameters("default")] == [id(p) for p in parameters_before]
    assert torch.equal(run(delta_model, "llama"), expected)


@pytest.mark.parametrize("bad_name", ["", "a.b"])
def test_malformed_adapter_name_is_refused(bad_name: str) -> None:
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(deltatune.AdapterNameError, match="names are non-empty, without '.'"):
        deltatune.attach(model, lora(), name=bad_name)
    assert_clean_plain(model, before)


def test_unknown_adapter_name_in_activate_delete_and_forward(tmp_path: Path) -> None:
    delta_model = deltatune.attach(build("llama"), lora())
    expected = run(delta_model, "llama").detach()
    message = r"no adapter named 'other'; this model has \['default'\]"
    with pytest.raises(deltatune.AdapterNameError, match=message):
        delta_model.activate("other")
    with pytest.raises(deltatune.AdapterNameError, match=message):
        delta_model.activate("default", "other")
    assert delta_model.active_adapters == ("default",)
    with pytest.raises(deltatune.AdapterNameError, match=message):
        delta_model.delete("other")
    assert list(delta_model.configs) == ["default"]
    with pytest.raises(deltatune.AdapterNameError, match=message):
        run(delta_model, "llama", adapter_names=["default", "other", None])
    with pytest.raises(deltatune.AdapterNameError, match=message):
        delta_model.set_trainable("other")
    with pytest.raises(deltatune.AdapterNameError, match=message):
        delta_model.merge(["other"])
    with pytest.raises(deltatune.AdapterNameError, match=message):
        delta_model.save(str(tmp_path / "unused"), names=["other"])
    assert not (tmp_path / "unused").exists()
    # Nothing of the refused calls stuck: no routing left over, same output.
    assert delta_model.routing.row_groups is None
    assert torch.equal(run(delta_model, "llama"), expected)


# ----------------------------------------------------------------------------- shapes
def test_adapter_of_another_shape_into_a_plain_model(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    model = llama_48()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = grad_flags(model)
    with pytest.raises(deltatune.AdapterShapeError) as caught:
        deltatune.load(model, str(folder))
    message = str(caught.value)
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj\.lora_A", message), message
    assert "(4, 32)" in message and "(4, 48)" in message, message
    assert "another shape" in message
    assert_clean_plain(model, before)


def test_adapter_of_another_shape_into_an_existing_delta_model(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    delta_model = deltatune.attach(llama_48(), lora(target_modules=["k_proj"]), name="mine")
    expected = run(delta_model, "llama").detach()
    flags = grad_flags(delta_model)
    sites_before = [name for name, _ in delta_model.sites()]
    with pytest.raises(deltatune.AdapterShapeError, match=r"lora_A.*\(4, 32\).*\(4, 48\)"):
        deltatune.load(delta_model, str(folder), name="theirs")
    assert list(delta_model.configs) == ["mine"]
    assert list(delta_model.targets) == ["mine"]
    assert delta_model.active_adapters == ("mine",)
    assert [name for name, _ in delta_model.sites()] == sites_before
    assert all("theirs" not in site.adapters for _, site in delta_model.sites())
    assert grad_flags(delta_model) == flags
    assert torch.equal(run(delta_model, "llama"), expected)


def test_adapter_with_a_missing_tensor_names_the_key(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    from safetensors.torch import load_file

    tensors = load_file(str(folder / WEIGHTS))
    del tensors["model.layers.1.self_attn.v_proj.lora_B"]
    real_save_file(tensors, str(folder / WEIGHTS))
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(deltatune.AdapterShapeError, match=r"no tensor 'model\.layers\.1\.self_attn\.v_proj\.lora_B'"):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


# ----------------------------------------------------------------------------- broken files
def test_truncated_weights_file(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    weights = folder / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    model = mixed_flags_llama()
    before = grad_flags(model)
    with pytest.raises(
        deltatune.AdapterFileError,
        match=re.escape(str(weights)) + r" is truncated or corrupted.*save or copy the adapter again",
    ):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


def test_weights_file_with_corrupted_header(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    weights = folder / WEIGHTS
    data = bytearray(weights.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    middle = 8 + header_length // 2
    data[middle : middle + 16] = b'\xff\x00{]\x01\x02\xfe""::,,\x00\x00\xff\xfe'
    weights.write_bytes(bytes(data))
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(deltatune.AdapterFileError, match=re.escape(str(weights)) + r" is truncated or corrupted"):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


def test_weights_file_of_random_bytes(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    weights = folder / WEIGHTS
    size = weights.stat().st_size
    weights.write_bytes(bytes(torch.randint(0, 256, (size,), dtype=torch.uint8).tolist()))
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(deltatune.AdapterFileError, match=re.escape(str(weights))):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


def test_broken_file_into_an_existing_delta_model_keeps_it_as_it_was(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    delta_model = deltatune.attach(build("llama"), lora(target_modules=["k_proj"]), name="mine")
    expected = run(delta_model, "llama").detach()
    with pytest.raises(deltatune.AdapterFileError, match=re.escape(str(weights))):
        deltatune.load(delta_model, str(folder), name="theirs")
    assert list(delta_model.configs) == ["mine"]
    assert all(list(site.adapters) == ["mine"] for _, site in delta_model.sites())
    assert torch.equal(run(delta_model, "llama"), expected)


def test_missing_weights_file(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    (folder / WEIGHTS).unlink()
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(
        deltatune.AdapterFileError, match=re.escape(str(folder / WEIGHTS)) + r" is missing.*save it again"
    ):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(deltatune.AdapterFileError, match=re.escape(f"no adapter at {missing}") + f".*{CONFIG}"):
        deltatune.load(model, str(missing))
    assert_clean_plain(model, before)


def test_empty_folder(tmp_path: Path) -> None:
    model = build("llama")
    with pytest.raises(deltatune.AdapterFileError, match="no adapter at .*subfolders"):
        deltatune.load(model, str(tmp_path))
    assert not has_sites(model)


def test_folder_with_invalid_json_config(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    (folder / CONFIG).write_text('{"format": "deltatune", "config": {"method": "lora", ')
    model = mixed_flags_llama()
    before = grad_flags(model)
    with pytest.raises(
        deltatune.AdapterFileError, match=r"cannot read .*" + re.escape(CONFIG) + r".*save the adapter again"
    ):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


def test_folder_with_a_foreign_json_config(saved_adapter: tuple[Path, torch.Tensor]) -> None:
    folder, _ = saved_adapter
    (folder / CONFIG).write_text(json.dumps({"hello": "world"}))
    model = build("llama")
    before = grad_flags(model)
    with pytest.raises(deltatune.AdapterFileError, match="neither a deltatune nor a peft adapter config"):
        deltatune.load(model, str(folder))
    assert_clean_plain(model, before)


def test_saving_into_a_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    delta_model = deltatune.attach(build("llama"), lora())
    with pytest.raises(deltatune.AdapterFileError, match="is a file; pass a folder path"):
        delta_model.save(str(target))
    assert target.read_text() == "keep me"


# ----------------------------------------------------------------------------- interrupted saves
class Interrupted(RuntimeError):
    pass


def other_adapter_model() -> deltatune.DeltaModel:
    """An adapter unlike the one in `saved_adapter` (other rank, other values): a save of it that
    went half way would show up as a folder that no longer loads, or loads to other outputs."""
    torch.manual_seed(123)
    return deltatune.attach(build("llama"), lora(r=2))


def assert_folder_intact(folder: Path, expected: torch.Tensor, files_before: dict[str, bytes]) -> None:
    assert no_temp_files(folder) == [], "an interrupted save left temporary files"
    assert sorted(os.listdir(folder)) == sorted(files_before)
    reloaded = deltatune.load(build("llama"), str(folder))
    assert torch.equal(run(reloaded, "llama"), expected)
    changed = [name for name in files_before if (folder / name).read_bytes() != files_before[name]]
    assert changed == [], f"an interrupted save changed {changed}"


def test_save_interrupted_while_writing_weights_leaves_the_old_adapter(
    saved_adapter: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, expected = saved_adapter
    files_before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as file:
            file.truncate(os.path.getsize(filename) // 2)
        raise Interrupted("disk full")

    monkeypatch.setattr(deltatune.atomic, "save_file", half_then_fail)
    with pytest.raises(Interrupted):
        other_adapter_model().save(str(folder))
    monkeypatch.undo()
    assert_folder_intact(folder, expected, files_before)


def test_save_interrupted_while_writing_config_leaves_the_old_adapter(
    saved_adapter: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, expected = saved_adapter
    files_before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    class HalfJson:
        """Stands in for the json module inside deltatune.atomic: writes half, then fails."""

        @staticmethod
        def dump(data, file, **kwargs):
            text = json.dumps(data, **kwargs)
            file.write(text[: len(text) // 2])
            raise Interrupted("killed while writing the config")

    monkeypatch.setattr(deltatune.atomic, "json", HalfJson)
    with pytest.raises(Interrupted):
        other_adapter_model().save(str(folder))
    monkeypatch.undo()
    assert_folder_intact(folder, expected, files_before)


def test_interrupted_first_save_leaves_no_adapter_folder_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "new"

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise Interrupted("power cut")

    monkeypatch.setattr(deltatune.atomic, "save_file", fail)
    with pytest.raises(Interrupted):
        deltatune.attach(build("llama"), lora()).save(str(folder))
    monkeypatch.undo()
    assert not (folder / WEIGHTS).exists() and not (folder / CONFIG).exists()
    assert no_temp_files(folder) == []
    with pytest.raises(deltatune.AdapterFileError, match="no adapter at"):
        deltatune.load(build("llama"), str(folder))
