"""A `modules_to_save` copy is of the module's own structure: adapters of other adapters placed inside
the module (and the hooks of their sites) stay with the original, as peft's copy is the original
module's weights, trained for its adapter only."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.site import DeltaSite
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MLP = "model.layers.0.mlp"


def lora(targets: list[str], **fields) -> deltatune.LoraConfig:
    return deltatune.LoraConfig(r=2, target_modules=targets, **fields)


def copy_of(delta_model: deltatune.DeltaModel, module_name: str, name: str) -> torch.nn.Module:
    return delta_model.base_model.get_submodule(module_name).deltatune.adapters[name].copy


def deltatune_hooks(module: torch.nn.Module) -> list[object]:
    """The hooks anywhere in `module` that are bound to a deltatune site."""
    return [
        hook
        for sub in module.modules()
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks)
        for hook in hooks.values()
        if isinstance(getattr(hook, "__self__", None), DeltaSite)
    ]


def test_a_module_copy_holds_no_adapter_placed_inside_the_module(tmp_path) -> None:
    delta_model = deltatune.attach(
        build("llama"), lora(["gate_proj", "up_proj", "down_proj"], init_lora_weights=False), name="a"
    )
    delta_model.add("b", lora(["q_proj"], modules_to_save=[MLP]))
    copied = copy_of(delta_model, MLP, "b")
    assert not any(isinstance(sub, DeltaSite) for sub in copied.modules())
    assert deltatune_hooks(copied) == []
    assert all(
        "deltatune" not in key for key in delta_model.base_model.get_submodule(MLP).deltatune.adapters["b"].file_state()
    )
    delta_model.activate("b")  # b is untrained: its LoRA adds nothing and its copy is the base MLP
    torch.testing.assert_close(run(delta_model, "llama"), run(build("llama"), "llama"), atol=0, rtol=0)
    delta_model.save(tmp_path / "b", names=["b"])
    loaded = deltatune.load(build("llama"), tmp_path / "b")
    torch.testing.assert_close(run(loaded, "llama"), run(delta_model, "llama"), atol=0, rtol=0)


def test_a_module_copy_keeps_no_hook_of_a_site_inside_the_module() -> None:
    """A Pfeiffer tap on the layer norm has a pre-hook there; the layer norm's copy for b has none."""
    delta_model = deltatune.attach(build("llama"), deltatune.BottleneckConfig(preset="pfeiffer"), name="a")
    norm = "model.layers.0.post_attention_layernorm"
    delta_model.add("b", lora(["q_proj"], modules_to_save=[norm]))
    copied = copy_of(delta_model, norm, "b")
    assert deltatune_hooks(copied) == [] and "deltatune" not in copied._modules
    delta_model.activate("b")
    torch.testing.assert_close(run(delta_model, "llama"), run(build("llama"), "llama"), atol=0, rtol=0)
    assert delta_model.base_model.get_submodule(norm).deltatune.adapters["a"] is not None


def test_an_adapter_added_inside_a_copied_module_later_stays_out_of_the_copy() -> None:
    delta_model = deltatune.attach(build("llama"), lora(["q_proj"], modules_to_save=[MLP]), name="b")
    delta_model.add("c", lora(["gate_proj"], init_lora_weights=False))
    copied = copy_of(delta_model, MLP, "b")
    assert not any(isinstance(sub, DeltaSite) for sub in copied.modules())
    torch.testing.assert_close(run(delta_model.activate("b"), "llama"), run(build("llama"), "llama"), atol=0, rtol=0)
    with_c = run(delta_model.activate("c"), "llama")
    delta_model.delete("b")
    torch.testing.assert_close(run(delta_model, "llama"), with_c, atol=0, rtol=0)
