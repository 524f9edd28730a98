"""The adapter family beyond the invariant table: placements, Compacter's math, AdapterDrop, Fusion,
Stack and loading onto a model that already has adapters."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.composition import setup_from_dict
from deltatune.methods.compacter import PHMLinear
from test_invariants import frozen, randomize
from tiny_models import ARCHS, build, run

ADAPTER_ARCHS = ["llama", "gpt2", "bert", "t5"]
PLACEMENTS = {
    "pfeiffer": lambda: deltatune.BottleneckConfig(preset="pfeiffer"),
    "parallel": lambda: deltatune.BottleneckConfig(preset="parallel"),
    "low_rank": lambda: deltatune.CompacterConfig(linear="low_rank", phm_rank=2, reduction_factor=4),
}


def with_adapters(arch: str, config, names=("a", "b")) -> deltatune.DeltaModel:
    delta_model = deltatune.DeltaModel(build(arch))
    for seed, name in enumerate(names):
        delta_model.add(name, config)
        randomize(delta_model, name, seed=seed + 1)
    return delta_model


def test_presets_fill_the_fields_and_explicit_values_win() -> None:
    parallel = deltatune.BottleneckConfig(preset="parallel", scaling=2.0)
    assert (parallel.parallel, parallel.reduction_factor, parallel.scaling, parallel.init_weights) == (
        True,
        2,
        2.0,
        "zero_up",
    )
    pfeiffer = deltatune.BottleneckConfig(preset="pfeiffer")
    assert (pfeiffer.attention_adapter, pfeiffer.ffn_adapter, pfeiffer.original_ln_before, pfeiffer.non_linearity) == (
        False,
        True,
        True,
        "relu",
    )
    compacter = deltatune.CompacterConfig()
    assert (compacter.attention_adapter, compacter.reduction_factor, compacter.non_linearity) == (True, 32, "gelu")
    assert deltatune.CompacterConfig.from_dict(compacter.to_dict()) == compacter
    with pytest.raises(deltatune.DeltaTuneError, match="preset"):
        deltatune.BottleneckConfig(preset="lora")


@pytest.mark.parametrize("arch", ADAPTER_ARCHS)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_mixed_batch_rows_and_save_load(placement: str, arch: str, tmp_path) -> None:
    delta_model = with_adapters(arch, PLACEMENTS[placement]())
    outputs = {}
    for name in ("a", "b"):
        delta_model.activate(name)
        outputs[name] = run(delta_model, arch)
    mixed = run(delta_model, arch, adapter_names=["b", None, "a"])
    torch.testing.assert_close(mixed[0], outputs["b"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], run(frozen(arch), arch)[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[2], outputs["a"][2], atol=1e-6, rtol=0)
    delta_model.save(tmp_path / "saved", names=["b"])
    loaded = deltatune.load(build(arch), tmp_path / "saved")
    assert torch.equal(run(loaded, arch), outputs["b"])


def test_phm_weight_is_the_sum_of_kronecker_products_and_the_rule_is_shared(tmp_path) -> None:
    delta_model = with_adapters("bert", deltatune.CompacterConfig(reduction_factor=4), names=("c",))
    layers = [module for module in delta_model.modules() if isinstance(module, PHMLinear)]
    assert len(layers) == 8 and len({id(layer.phm_rule) for layer in layers}) == 1
    layer = layers[3]
    blocks = torch.bmm(layer.W_left, layer.W_right)
    expected = sum(torch.kron(layer.phm_rule[i], blocks[i]) for i in range(layer.phm_rule.shape[0]))
    torch.testing.assert_close(layer.weight(), expected)
    x = torch.randn(2, 5, layer.in_features)
    torch.testing.assert_close(layer(x), x @ expected + layer.bias)
    summary = delta_model.trainable_summary()
    assert (
        summary.per_adapter["c"]
        == summary.trainable
        == sum(p.numel() for p in delta_model.parameters() if p.requires_grad)
    )
    delta_model.save(tmp_path / "c")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "adapter_model.safetensors"), "pt") as file:
        assert sum(key.endswith("phm_rule") for key in file.keys()) == 1


def test_skipping_every_layer_equals_the_base_model_exactly() -> None:
    for arch in ADAPTER_ARCHS:
        delta_model = with_adapters(arch, deltatune.BottleneckConfig(), names=("a",))
        layers = 4 if arch == "t5" else 2
        delta_model.activate("a", skip_layers=range(layers))
        assert torch.equal(run(delta_model, arch), run(frozen(arch), arch)), arch
        delta_model.activate("a")
        assert not torch.allclose(run(delta_model, arch), run(frozen(arch), arch))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_skipping_the_lowest_layers_keeps_their_outputs_equal_to_the_base(arch: str) -> None:
    base = frozen(arch)
    delta_model = deltatune.attach(build(arch), deltatune.BottleneckConfig())
    randomize(delta_model, "default")
    inputs = ARCHS[arch].inputs(1)
    expected = base(**inputs, output_hidden_states=True).hidden_states
    delta_model.activate("default", skip_layers=[0])
    hidden = delta_model(**inputs, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[0], expected[0]) and torch.equal(hidden[1], expected[1])
    assert not torch.allclose(hidden[2], expected[2])


def test_adapterdrop_in_training_skips_a_random_number_of_lowest_layers() -> None:
    delta_model = with_adapters("llama", deltatune.BottleneckConfig(), names=("a",))
    references = []
    for lowest in range(3):
        delta_model.activate("a", skip_layers=range(lowest))
        references.append(run(delta_model, "llama"))
    delta_model.activate("a", train_skip_lowest=2)
    delta_model.train()
    seen = set()
    for _ in range(12):
        output = run(delta_model, "llama")
        matches = [index for index, reference in enumerate(references) if torch.equal(output, reference)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) >= 2
    delta_model.eval()
    assert torch.equal(run(delta_model, "llama"), references[0])


def test_stack_feeds_one_adapter_into_the_next_and_serialises() -> None:
    delta_model = with_adapters("bert", deltatune.BottleneckConfig())
    delta_model.activate(deltatune.Stack("a", "b"))
    stacked = run(delta_model, "bert")
    delta_model.activate("a", "b")
    assert torch.equal(run(delta_model, "bert"), stacked)
    delta_model.activate(deltatune.Stack("b", "a"))
    assert not torch.allclose(run(delta_model, "bert"), stacked)
    setup = deltatune.Stack("a", deltatune.Fuse("b", "c"))
    assert setup_from_dict(setup.to_dict()) == setup


def fused(arch: str = "bert") -> deltatune.DeltaModel:
    delta_model = with_adapters(arch, deltatune.BottleneckConfig())
    delta_model.fuse("a", "b")
    randomize(delta_model, "a,b", seed=7)
    return delta_model


def test_fusion_training_touches_only_fusion_parameters() -> None:
    delta_model = fused()
    assert delta_model.active_adapters == ("a,b",)
    fusion_ids = {id(p) for p in delta_model.adapter_parameters("a,b")}
    assert {id(p) for p in delta_model.parameters() if p.requires_grad} == fusion_ids
    frozen_before = {
        name: tensor.clone() for name, tensor in delta_model.state_dict().items() if ".adapters.a,b." not in name
    }
    fusion_before = [p.detach().clone() for p in delta_model.adapter_parameters("a,b")]
    output_before = run(delta_model, "bert").detach()
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        run(delta_model, "bert", seed=10 + step).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = delta_model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in frozen_before.items())
    assert all(not torch.equal(p, before) for p, before in zip(delta_model.adapter_parameters("a,b"), fusion_before))
    assert not torch.allclose(run(delta_model, "bert"), output_before)


def test_fused_model_saves_and_loads_into_a_fresh_model(tmp_path) -> None:
    delta_model = fused()
    expected = run(delta_model, "bert")
    delta_model.save(tmp_path / "all")
    loaded = deltatune.load(build("bert"), tmp_path / "all")
    loaded.activate(deltatune.Fuse("a", "b"))
    assert torch.equal(run(loaded, "bert"), expected)


def test_a_fusion_saves_on_its_own_and_loads_onto_a_model_with_its_adapters(tmp_path) -> None:
    delta_model = fused()
    expected = run(delta_model, "bert")
    delta_model.save(tmp_path / "adapters", names=["a", "b"])
    delta_model.save(tmp_path / "fusion", names=["a,b"])
    target = deltatune.load(build("bert"), tmp_path / "adapters")
    with pytest.raises(deltatune.AdapterNameError, match="fuse"):
        target.activate(deltatune.Fuse("a", "b"))
    deltatune.load(target, tmp_path / "fusion", name="a,b")
    target.activate(deltatune.Fuse("a", "b"))
    assert torch.equal(run(target, "bert"), expected)
    with pytest.raises(deltatune.AdapterNameError, match="add or load them first"):
        deltatune.load(build("bert"), tmp_path / "fusion")


@pytest.mark.parametrize("skip_layers", [(), (0,)], ids=["every-layer", "adapterdrop-layer-0"])
def test_fusion_rows_in_a_mixed_batch_equal_separate_runs(skip_layers: tuple[int, ...]) -> None:
    """Under AdapterDrop too: each row skips the layers its setup run alone skips."""
    delta_model = fused()
    delta_model.activate(deltatune.Fuse("a", "b"), skip_layers=skip_layers)
    fusion_output = run(delta_model, "bert")
    delta_model.activate("a", skip_layers=skip_layers)
    output_a = run(delta_model, "bert")
    mixed = run(delta_model, "bert", adapter_names=["a,b", "a", None])
    torch.testing.assert_close(mixed[0], fusion_output[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], output_a[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[2], run(frozen("bert"), "bert")[2], atol=1e-6, rtol=0)


def test_load_adds_an_adapter_to_a_model_that_already_has_some(tmp_path) -> None:
    source = with_adapters("llama", deltatune.BottleneckConfig(preset="parallel"), names=("parallel",))
    expected = run(source, "llama")
    source.save(tmp_path / "parallel")
    target = deltatune.attach(build("llama"), deltatune.LoraConfig(r=2, target_modules=["q_proj"]), name="lora")
    assert deltatune.load(target, tmp_path / "parallel") is target
    assert sorted(target.configs) == ["lora", "parallel"]
    target.activate("parallel")
    assert torch.equal(run(target, "llama"), expected)


def test_fusing_needs_bottleneck_adapters_at_shared_sites() -> None:
    delta_model = deltatune.attach(build("bert"), deltatune.LoraConfig(r=2), name="a")
    delta_model.add("b", deltatune.LoraConfig(r=2))
    with pytest.raises(deltatune.AdapterNameError, match="bottleneck"):
        delta_model.fuse("a", "b")
    assert sorted(delta_model.configs) == ["a", "b"]
    with pytest.raises(deltatune.DeltaTuneError, match="two or more"):
        deltatune.Fuse("a")
