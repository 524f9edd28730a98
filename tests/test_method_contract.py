"""The method contract: `DeltaModel.add` places `modules_to_save` for every method, undoes a failed add,
tells a method when the weights come from a file, and removal runs every adapter's `close()`; adapters
reading a sublayer's input share their module's one pre-hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune
from deltatune.architectures import sublayer_sites
from deltatune.methods.module_copy import ModuleCopy
from deltatune.site import DeltaSite, site_of
from tiny_models import build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fused_bert(**fusion_options) -> deltatune.DeltaModel:
    delta_model = deltatune.attach(build("bert"), deltatune.BottleneckConfig(preset="pfeiffer"), name="a")
    delta_model.add("b", deltatune.BottleneckConfig(preset="pfeiffer"))
    delta_model.add("ab", deltatune.FusionConfig(adapters=["a", "b"], **fusion_options))
    delta_model.activate(deltatune.Fuse("a", "b"))
    return delta_model.eval()


def test_a_fusion_gives_its_modules_to_save_a_trainable_copy() -> None:
    delta_model = fused_bert(modules_to_save=["classifier"])
    classifier = delta_model.base_model.classifier
    copy = (
        site_of(classifier).adapters["ab"]
        if site_of(classifier) is not None and "ab" in site_of(classifier).adapters
        else None
    )
    assert isinstance(copy, ModuleCopy), "the fusion's modules_to_save got no copy of the classifier"
    copied = {id(parameter) for parameter in copy.parameters()}
    assert copied and copied <= {id(parameter) for parameter in delta_model.adapter_parameters("ab")}
    assert all(parameter.requires_grad for parameter in copy.parameters())
    assert not classifier.weight.requires_grad
    before = run(delta_model, "bert").detach()
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(1.0)
    assert not torch.allclose(run(delta_model, "bert"), before), "the fusion's classifier copy does not run"
    delta_model.delete("ab")
    assert site_of(classifier) is None


def test_a_fusion_with_modules_to_save_saves_and_loads_its_copy(tmp_path: Path) -> None:
    delta_model = fused_bert(modules_to_save=["classifier"])
    copy = site_of(delta_model.base_model.classifier).adapters["ab"]
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(0.5)
    expected = run(delta_model, "bert").detach()
    delta_model.save(str(tmp_path / "adapters"))
    loaded = deltatune.load(build("bert"), str(tmp_path / "adapters")).activate(deltatune.Fuse("a", "b")).eval()
    torch.testing.assert_close(run(loaded, "bert"), expected, atol=0, rtol=0)


def input_modules(model: nn.Module) -> list[nn.Module]:
    return [model.get_submodule(site.input) for site in sublayer_sites(model) if site.kind == "ffn"]


@pytest.mark.parametrize("preset", ["parallel", "pfeiffer"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_adapters_reading_a_sublayer_input_share_one_pre_hook_per_input_module(arch: str, preset: str) -> None:
    model = build(arch)
    delta_model = deltatune.attach(model, deltatune.BottleneckConfig(preset=preset), name="a")
    for name in ("b", "c"):
        delta_model.add(name, deltatune.BottleneckConfig(preset=preset))
    modules = input_modules(model)
    assert modules and [len(module._forward_pre_hooks) for module in modules] == [1] * len(modules)
    for name in ("a", "b", "c"):
        delta_model.delete(name)
    assert [len(module._forward_pre_hooks) + len(module._forward_hooks) for module in modules] == [0] * len(modules)


def test_a_fused_parallel_adapter_reads_its_input_though_only_the_fusion_is_active() -> None:
    delta_model = deltatune.attach(
        build("llama"), deltatune.BottleneckConfig(preset="parallel", init_weights="bert"), name="a"
    )
    delta_model.add("b", deltatune.BottleneckConfig(preset="parallel", init_weights="bert"))
    delta_model.fuse("a", "b")
    assert delta_model.active_adapters == ("a,b",)
    assert torch.isfinite(run(delta_model.eval(), "llama")).all()


class FailingAdapter(deltatune.SiteAdapter):
    """An adapter whose `close()` is counted; the method below fails after placing some of them."""

    closed = 0

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output

    def close(self) -> None:
        type(self).closed += 1


class FailHalfwayConfig(deltatune.TargetedConfig):
    pass


@deltatune.register("fail_halfway")
class FailHalfway:
    config_class = FailHalfwayConfig

    def attach(self, placement: deltatune.Placement, config: FailHalfwayConfig) -> None:
        placement.put("model.layers.0.self_attn.q_proj", FailingAdapter())
        placement.put("model.layers.1.self_attn.q_proj", FailingAdapter())
        raise deltatune.DeltaTuneError("this method fails after placing two adapters")


def test_a_failed_add_takes_off_what_it_placed_and_closes_it() -> None:
    model = build("llama")
    delta_model = deltatune.attach(model, deltatune.LoraConfig(r=2, target_modules=["q_proj"]), name="lora")
    expected = run(delta_model, "llama").detach()
    FailingAdapter.closed = 0
    with pytest.raises(deltatune.DeltaTuneError, match="fails after placing"):
        delta_model.add("broken", FailHalfwayConfig(modules_to_save=["lm_head"]))
    assert FailingAdapter.closed == 2
    assert list(delta_model.configs) == ["lora"]
    assert all(list(site.adapters) == ["lora"] for _, site in delta_model.sites())
    assert site_of(model.lm_head) is None
    torch.testing.assert_close(run(delta_model, "llama"), expected, atol=0, rtol=0)


def test_placing_two_adapters_of_one_name_at_a_module_is_refused() -> None:
    placement = deltatune.Placement(build("llama"), "x", deltatune.DeltaModel(build("mlp")).routing)
    placement.put("model.layers.0.self_attn.q_proj", FailingAdapter())
    with pytest.raises(deltatune.PlacementError, match="already holds an adapter 'x'"):
        placement.put("model.layers.0.self_attn.q_proj", FailingAdapter())
    placement.undo()
    assert not any(isinstance(module, DeltaSite) for module in placement.model.modules())


class CountedConfig(deltatune.DeltaConfig):
    pass


@deltatune.register("counted")
class Counted:
    """One `FailingAdapter` (a pass-through that counts its `close()`) at every q_proj."""

    config_class = CountedConfig

    def attach(self, placement: deltatune.Placement, config: CountedConfig) -> None:
        for layer in range(2):
            placement.put(f"model.layers.{layer}.self_attn.q_proj", FailingAdapter())


@pytest.mark.parametrize("removal", ["delete", "unload"])
def test_removal_closes_every_adapter_it_takes_off(removal: str) -> None:
    model = build("llama")
    delta_model = deltatune.attach(model, CountedConfig(modules_to_save=["lm_head"]), name="counted")
    assert delta_model.targets["counted"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    FailingAdapter.closed = 0
    delta_model.delete("counted") if removal == "delete" else delta_model.unload(merge=False)
    assert FailingAdapter.closed == 2
    assert not any(isinstance(module, DeltaSite) for module in model.modules())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
