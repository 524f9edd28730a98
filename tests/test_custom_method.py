"""Methods defined outside the library, registered with `@deltatune.register`, work end to end:
attach, train, save, load, merge, remove; with no edit to deltatune itself. A method builds adapters and
puts them at modules through the `Placement` that `DeltaModel.add` hands it; sites, hooks and routing
are the library's business.

`scaled_output` (a `ModuleMethod`: one adapter per selected layer): a learned per-feature scale γ on
each adapted layer's output, y ← y ⊙ (1 + γ), γ zero at start. For a linear layer y = W x + b this is
W' = W + W ⊙ γ[:, None], b' = b + b ⊙ γ, so it merges.

`shifted_blocks` (its own `attach`, two kinds of site): γ on the selected linear layers as above, and a
learned vector β added to the output of every transformer block, h ← h + β (β zero at start; not
mergeable, since a block has no weight it could go into). It also reads and writes peft's folder layout
through a codec of its own (`ShiftedBlocksPeft`): peft type "SHIFTED_BLOCKS", γ under
`base_model.model.<layer>.output_scale`, β under `base_model.model.<block>.block_shift`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.site import DeltaSite
from tiny_models import build, run


@dataclasses.dataclass
class ScaledOutputConfig(deltatune.TargetedConfig):
    """Settings of the scaled-output method."""

    init_scale: float = 0.0
    """Starting value of every γ (0: the adapted model equals the base model)."""

    def validate(self) -> None:
        if not -1.0 < self.init_scale < 10.0:
            raise deltatune.DeltaTuneError(f"init_scale must be in (-1, 10), got {self.init_scale}")


class OutputScale(deltatune.SiteAdapter):
    """γ over the output features of an `nn.Linear` (weight out × in) or GPT-2 `Conv1D` (in × out)."""

    def __init__(self, module: nn.Module, module_name: str, config: ScaledOutputConfig) -> None:
        super().__init__()
        self.transposed = isinstance(module, Conv1D)
        features = module.weight.shape[-1] if self.transposed else module.weight.shape[0]
        self.gamma = nn.Parameter(
            torch.full((features,), config.init_scale, dtype=module.weight.dtype, device=module.weight.device)
        )

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        return output * (1 + self.gamma.to(output.dtype))

    def delta_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        gamma = self.gamma.detach().float()
        weight = module.weight.detach().float()
        deltas = {"weight": weight * gamma[None, :] if self.transposed else weight * gamma[:, None]}
        if module.bias is not None:
            deltas["bias"] = module.bias.detach().float() * gamma
        return deltas


@deltatune.register("scaled_output")
class ScaledOutput(deltatune.ModuleMethod):
    """Scale the outputs of the selected linear layers."""

    config_class = ScaledOutputConfig
    adapter_types = {nn.Linear: OutputScale, Conv1D: OutputScale}


@dataclasses.dataclass
class ShiftedBlocksConfig(ScaledOutputConfig):
    """Settings of the shifted-blocks method: `target_modules` picks the scaled linear layers."""

    blocks: str = r"model\.layers\.\d+"
    """A full-match regular expression for the blocks whose output gets β."""


class BlockShift(deltatune.SiteAdapter):
    """β over the hidden size, added to a block's output (a tensor, or a tuple led by the hidden states)."""

    def __init__(self, hidden: int, reference: torch.Tensor) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(hidden, dtype=reference.dtype, device=reference.device))

    def forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if isinstance(output, tuple):
            return (output[0] + self.beta.to(output[0].dtype), *output[1:])
        return output + self.beta.to(output.dtype)


class ShiftedBlocksPeft(deltatune.PeftCodec):
    """The shifted-blocks method in peft's folder layout (a method peft itself does not have)."""

    peft_type = "SHIFTED_BLOCKS"
    tensor_names = {OutputScale: {"gamma": "output_scale"}, BlockShift: {"beta": "block_shift"}}

    def config_to_peft(self, config: ShiftedBlocksConfig, targets: list[str], model: nn.Module) -> dict:
        return {"target_modules": config.target_modules, "blocks": config.blocks, "init_scale": config.init_scale}

    def config_from_peft(self, data: dict) -> ShiftedBlocksConfig:
        return ShiftedBlocksConfig(
            target_modules=data["target_modules"], blocks=data["blocks"], init_scale=data["init_scale"]
        )


@deltatune.register("shifted_blocks")
class ShiftedBlocks:
    """γ at the selected linear layers, β at every block's output: two kinds of site, one adapter."""

    config_class = ShiftedBlocksConfig
    peft_codec = ShiftedBlocksPeft()

    def attach(self, placement: deltatune.Placement, config: ShiftedBlocksConfig) -> None:
        model = placement.model
        scaled = ScaledOutput().select(model, config)
        blocks = [name for name, _ in model.named_modules() if re.fullmatch(config.blocks, name)]
        if not blocks:
            raise deltatune.TargetNotFoundError(
                f"no module matches blocks={config.blocks!r}; give the regular expression of the model's blocks"
            )
        for name in scaled:
            placement.put(name, OutputScale(model.get_submodule(name), name, config))
        reference = model.get_input_embeddings().weight
        for layer, name in enumerate(blocks):
            placement.put(name, BlockShift(reference.shape[1], reference), layer=layer)


# ----------------------------------------------------------------------------- helpers
TARGETS = ["q_proj", "v_proj", "down_proj"]


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's own parameters (not the ones deltatune added)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".deltatune." not in name}


def trained(
    targets=TARGETS, steps: int = 6
) -> tuple[deltatune.DeltaModel, nn.Module, dict[str, torch.Tensor], list[float]]:
    """A tiny Llama with a scaled_output adapter trained a few steps; also its base parameters at start
    and the losses seen."""
    model = build("llama")
    before = base_parameters(model)
    delta_model = deltatune.attach(model, ScaledOutputConfig(target_modules=targets))
    delta_model.train()
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=5e-2)
    input_ids = torch.randint(3, 96, (4, 8), generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        loss = delta_model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    delta_model.eval()
    return delta_model, model, before, losses


# ----------------------------------------------------------------------------- tests
def test_registration_stamps_the_config_and_lists_the_method() -> None:
    assert ScaledOutputConfig.method == "scaled_output"
    assert ScaledOutputConfig(target_modules=["q_proj"]).to_dict()["method"] == "scaled_output"
    assert "scaled_output" in deltatune.registered_methods()
    assert isinstance(deltatune.get_method("scaled_output"), ScaledOutput)
    assert isinstance(deltatune.get_method("scaled_output"), deltatune.Method)


def test_attaches_to_the_selected_layers_only_and_starts_as_the_base_model() -> None:
    model = build("llama")
    expected = run(model, "llama").detach()
    delta_model = deltatune.attach(model, ScaledOutputConfig(target_modules=TARGETS))
    sites = dict(delta_model.sites())
    assert sorted(sites) == sorted(
        f"model.layers.{i}.{part}"
        for i in range(2)
        for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert all(isinstance(site.adapters["default"], OutputScale) for site in sites.values())
    assert sites["model.layers.0.self_attn.v_proj"].adapters["default"].gamma.shape == (16,)  # 2 kv heads × head dim 8
    trainable = [name for name, p in delta_model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".deltatune.adapters.default.gamma") for name in trainable)
    assert delta_model.trainable_summary().per_adapter == {"default": 2 * (32 + 16 + 32)}
    assert torch.equal(run(delta_model, "llama"), expected)


def test_all_linear_and_errors_come_from_the_shared_targeting() -> None:
    delta_model = deltatune.attach(build("llama"), ScaledOutputConfig(target_modules="all-linear"))
    assert len(list(delta_model.sites())) == 2 * 7  # q k v o gate up down per block; lm_head left out
    with pytest.raises(deltatune.TargetNotFoundError, match="q_proj"):
        deltatune.attach(build("llama"), ScaledOutputConfig(target_modules=["q_prj"]))
    with pytest.raises(deltatune.UnsupportedModuleError, match="scaled_output cannot adapt"):
        deltatune.attach(build("llama"), ScaledOutputConfig(target_modules=["mlp"]))
    with pytest.raises(deltatune.TargetNotFoundError, match="needs target_modules"):
        deltatune.attach(build("llama"), ScaledOutputConfig())
    with pytest.raises(deltatune.DeltaTuneError, match="init_scale"):
        ScaledOutputConfig(init_scale=-3.0)


def test_trains_and_leaves_the_base_weights_bit_identical() -> None:
    delta_model, model, before, losses = trained()
    assert losses[-1] < losses[0] - 1e-3, losses
    after = base_parameters(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    gammas = list(delta_model.adapter_parameters("default"))
    assert all(g.abs().max() > 0 for g in gammas), "some γ did not train"
    with delta_model.disabled():
        assert torch.equal(run(delta_model, "llama"), run(build("llama"), "llama"))


def test_save_then_load_into_a_fresh_model_gives_equal_outputs(tmp_path: Path) -> None:
    delta_model, _, _, _ = trained()
    expected = run(delta_model, "llama").detach()
    folder = tmp_path / "scaled"
    delta_model.save(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    loaded = deltatune.load(build("llama"), str(folder))
    assert isinstance(loaded.configs["default"], ScaledOutputConfig)
    assert loaded.configs["default"].target_modules == TARGETS
    assert torch.equal(run(loaded, "llama"), expected)
    assert not any(p.requires_grad for p in loaded.parameters())

    again = deltatune.load(build("llama"), str(folder), name="again", trainable=True)
    assert list(again.configs) == ["again"]
    assert all(p.requires_grad for p in again.adapter_parameters("again"))
    assert torch.equal(run(again, "llama"), expected)


def test_merge_matches_unmerged() -> None:
    delta_model, model, before, _ = trained()
    unmerged = run(delta_model, "llama").detach()
    delta_model.merge()
    assert all(site.merged == ["default"] for _, site in delta_model.sites())
    torch.testing.assert_close(run(delta_model, "llama"), unmerged, atol=1e-5, rtol=1e-4)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.get_parameter(q_proj), before[q_proj])

    plain = delta_model.unload(merge=True)
    assert not any(isinstance(module, DeltaSite) for module in plain.modules())
    torch.testing.assert_close(run(plain, "llama"), unmerged, atol=1e-5, rtol=1e-4)


def test_unmerge_restores_the_base_weights() -> None:
    """ΔW = W ⊙ γ depends on W, as the contract allows (`delta_parameters(module)`): unmerge must take
    out the delta that merge put in, not one computed again from the merged weights."""
    delta_model, model, before, _ = trained()
    unmerged = run(delta_model, "llama").detach()
    delta_model.merge()
    delta_model.unmerge()
    after = base_parameters(model)
    worst = max((after[name] - before[name]).abs().max().item() for name in before)
    assert worst < 1e-6, f"unmerge left the base weights off by up to {worst}"
    torch.testing.assert_close(run(delta_model, "llama"), unmerged, atol=1e-5, rtol=1e-4)


def test_merge_with_biases_and_conv1d() -> None:
    """Layers with a bias (MLP) and GPT-2's transposed Conv1D take the right delta."""
    for arch, targets in (("mlp", ["net.0", "net.2", "head"]), ("gpt2", ["c_attn", "c_fc"])):
        model = build(arch)
        delta_model = deltatune.attach(model, ScaledOutputConfig(target_modules=targets, init_scale=0.0))
        with torch.no_grad():
            for parameter in delta_model.adapter_parameters("default"):
                parameter.uniform_(-0.5, 0.5)
        unmerged = run(delta_model, arch).detach()
        delta_model.merge()
        torch.testing.assert_close(run(delta_model, arch), unmerged, atol=1e-5, rtol=1e-4)
        delta_model.unmerge()


def test_lives_beside_builtin_methods() -> None:
    """A LoRA adapter and a scaled_output adapter on one model: each can be active, both together."""
    model = build("llama")
    base = run(model, "llama").detach()
    delta_model = deltatune.attach(
        model, deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), name="lora"
    )
    delta_model.add("scale", ScaledOutputConfig(target_modules=["q_proj", "o_proj"], init_scale=0.25))
    with_lora = run(delta_model, "llama").detach()
    delta_model.activate("scale")
    with_scale = run(delta_model, "llama").detach()
    delta_model.activate("lora", "scale")
    both = run(delta_model, "llama").detach()
    assert not torch.allclose(with_lora, base) and not torch.allclose(with_scale, base)
    assert not torch.allclose(both, with_lora) and not torch.allclose(both, with_scale)
    delta_model.delete("scale")
    assert torch.equal(run(delta_model, "llama"), with_lora)


def test_registering_the_same_name_for_another_class_is_refused() -> None:
    @dataclasses.dataclass
    class OtherConfig(deltatune.TargetedConfig):
        pass

    class Other(deltatune.ModuleMethod):
        config_class = OtherConfig
        adapter_types = {nn.Linear: OutputScale}

    with pytest.raises(
        deltatune.MethodNameError, match=r"'scaled_output' is already taken by ScaledOutput; pick another name"
    ):
        deltatune.register("scaled_output")(Other)
    assert isinstance(deltatune.get_method("scaled_output"), ScaledOutput)
    assert ScaledOutputConfig.method == "scaled_output"
    assert OtherConfig.method == ""


def test_registration_needs_a_config_class_and_a_valid_name() -> None:
    class NoConfig:
        pass

    with pytest.raises(TypeError, match="needs a `config_class`"):
        deltatune.register("no_config_here")(NoConfig)
    assert "no_config_here" not in deltatune.registered_methods()
    with pytest.raises(deltatune.MethodNameError, match="must be letters, digits"):
        deltatune.register("bad name!")


# ----------------------------------------------------------------------------- two kinds of site
SHIFTED_TARGETS = ["q_proj"]
BLOCKS = ["model.layers.0", "model.layers.1"]
SCALED = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def shifted(seed: int = 3) -> tuple[deltatune.DeltaModel, nn.Module]:
    """A tiny Llama with a shifted_blocks adapter whose γ and β are random (not the identity)."""
    model = build("llama")
    delta_model = deltatune.attach(model, ShiftedBlocksConfig(target_modules=SHIFTED_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return delta_model, model


def test_a_method_with_its_own_attach_places_adapters_at_two_kinds_of_site() -> None:
    model = build("llama")
    expected = run(model, "llama").detach()
    delta_model = deltatune.attach(model, ShiftedBlocksConfig(target_modules=SHIFTED_TARGETS))
    assert delta_model.targets["default"] == SCALED + BLOCKS
    sites = dict(delta_model.sites())
    assert sorted(sites) == sorted(SCALED + BLOCKS)
    assert [type(sites[name].adapters["default"]) for name in SCALED + BLOCKS] == [
        OutputScale,
        OutputScale,
        BlockShift,
        BlockShift,
    ]
    assert delta_model.trainable_summary().per_adapter == {"default": 2 * 32 + 2 * 32}
    assert torch.equal(run(delta_model, "llama"), expected)


def test_a_two_site_method_trains_both_kinds_of_adapter() -> None:
    model = build("llama")
    delta_model = deltatune.attach(model, ShiftedBlocksConfig(target_modules=SHIFTED_TARGETS)).train()
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=5e-2)
    input_ids = torch.randint(3, 96, (4, 8), generator=torch.Generator().manual_seed(7))
    for _ in range(3):
        loss = delta_model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sites = dict(delta_model.sites())
    assert all(sites[name].adapters["default"].gamma.abs().max() > 0 for name in SCALED)
    assert all(sites[name].adapters["default"].beta.abs().max() > 0 for name in BLOCKS)


def test_a_two_site_method_saves_and_loads_in_our_format(tmp_path: Path) -> None:
    delta_model, _ = shifted()
    expected = run(delta_model, "llama").detach()
    delta_model.save(str(tmp_path / "shifted"))
    loaded = deltatune.load(build("llama"), str(tmp_path / "shifted"))
    assert isinstance(loaded.configs["default"], ShiftedBlocksConfig)
    assert loaded.targets["default"] == SCALED + BLOCKS
    assert torch.equal(run(loaded, "llama"), expected)


def test_a_two_site_method_saves_and_loads_in_peft_format_through_its_own_codec(tmp_path: Path) -> None:
    delta_model, _ = shifted()
    expected = run(delta_model, "llama").detach()
    delta_model.save(str(tmp_path / "shifted"), format="peft")
    config = json.loads((tmp_path / "shifted" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIFTED_BLOCKS" and config["blocks"] == ShiftedBlocksConfig.blocks
    with safe_open(str(tmp_path / "shifted" / "adapter_model.safetensors"), framework="pt") as file:
        keys = set(file.keys())
    assert keys == {f"base_model.model.{name}.output_scale" for name in SCALED} | {
        f"base_model.model.{name}.block_shift" for name in BLOCKS
    }
    loaded = deltatune.load(build("llama"), str(tmp_path / "shifted"))
    assert isinstance(loaded.configs["default"], ShiftedBlocksConfig)
    assert loaded.targets["default"] == SCALED + BLOCKS
    assert torch.equal(run(loaded, "llama"), expected)


@pytest.mark.parametrize("removal", ["delete", "unload"])
def test_a_two_site_method_is_removed_without_a_trace(removal: str) -> None:
    delta_model, model = shifted()
    base = run(build("llama"), "llama").detach()
    assert not torch.equal(run(delta_model, "llama"), base)
    if removal == "delete":
        delta_model.delete("default")
        assert dict(delta_model.configs) == {} and list(delta_model.sites()) == []
    else:
        assert delta_model.unload(merge=False) is model
    assert not any(isinstance(module, DeltaSite) for module in model.modules())
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    assert torch.equal(run(model, "llama"), base)


def test_merging_a_method_with_an_unmergeable_site_is_refused_and_changes_no_weight() -> None:
    delta_model, model = shifted()
    before = base_parameters(model)
    with pytest.raises(deltatune.DeltaTuneError, match="BlockShift cannot be merged"):
        delta_model.merge()
    after = base_parameters(model)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_adapter_drop_skips_a_two_site_method_by_the_layers_it_recorded() -> None:
    """AdapterDrop skips by the block index the method gave at placement (`layer=`), for every site of
    those blocks: here all of them, so the model computes as the base model."""
    delta_model, _ = shifted()
    delta_model.activate("default", skip_layers=[0, 1])
    assert torch.equal(run(delta_model, "llama"), run(build("llama"), "llama"))
