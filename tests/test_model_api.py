"""DeltaModel behaviour beyond the invariant table: transformers integration, training helpers,
adapter management."""

from __future__ import annotations

import pytest
import torch

import deltatune
from tiny_models import build, run


def lora(**fields) -> deltatune.LoraConfig:
    return deltatune.LoraConfig(**{"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **fields})


def test_transformers_attributes_pass_through() -> None:
    delta_model = deltatune.attach(build("llama"), lora())
    assert delta_model.config.model_type == "llama"
    assert delta_model.get_input_embeddings() is delta_model.base_model.model.embed_tokens


def test_default_targets_follow_the_model_type() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=2))
    assert {name.rsplit(".", 1)[-1] for name in delta_model.targets["default"]} == {"q_proj", "v_proj"}


def test_all_linear_leaves_the_output_head_alone() -> None:
    delta_model = deltatune.attach(build("gpt2"), lora())
    assert "lm_head" not in delta_model.targets["default"]
    assert any(name.endswith("c_attn") for name in delta_model.targets["default"])


def test_layers_to_transform_and_exclude_modules_narrow_the_selection() -> None:
    delta_model = deltatune.attach(build("llama"), lora(layers_to_transform=[1], exclude_modules=["k_proj"]))
    targets = delta_model.targets["default"]
    assert targets and all(".layers.1." in name for name in targets)
    assert not any(name.endswith("k_proj") for name in targets)


def test_rank_and_alpha_patterns_set_per_module_rank_and_scale() -> None:
    delta_model = deltatune.attach(build("llama"), lora(rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 32}))
    sites = dict(delta_model.sites())
    assert sites["model.layers.0.self_attn.q_proj"].adapters["default"].rank == 8
    assert sites["model.layers.0.self_attn.k_proj"].adapters["default"].rank == 4
    assert sites["model.layers.0.self_attn.v_proj"].adapters["default"].scaling == 32 / 4


def test_rslora_scales_by_the_square_root_of_the_rank() -> None:
    delta_model = deltatune.attach(build("llama"), lora(r=16, lora_alpha=8, use_rslora=True))
    adapter = next(site for _, site in delta_model.sites()).adapters["default"]
    assert adapter.scaling == pytest.approx(8 / 4)


def test_generate_runs_with_the_adapter() -> None:
    base = build("llama")
    prompt = torch.tensor([[5, 6, 7, 8]])
    delta_model = deltatune.attach(base, lora())
    generated = delta_model.generate(prompt, max_new_tokens=5, do_sample=False)
    with delta_model.disabled():
        plain = delta_model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9) and not torch.equal(generated, plain)


def test_mixed_batch_generate_equals_separate_generation() -> None:
    delta_model = deltatune.attach(build("llama"), lora(), name="a")
    delta_model.add("b", lora(lora_alpha=64))
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    rows = []
    for row, name in enumerate(["a", "b", None]):
        if name is None:
            with delta_model.disabled():
                rows.append(delta_model.generate(prompts[row : row + 1], max_new_tokens=6, do_sample=False))
        else:
            delta_model.activate(name)
            rows.append(delta_model.generate(prompts[row : row + 1], max_new_tokens=6, do_sample=False))
    mixed = delta_model.generate(prompts, max_new_tokens=6, do_sample=False, adapter_names=["a", "b", None])
    assert torch.equal(mixed, torch.cat(rows))


def test_lora_trains_with_gradient_checkpointing() -> None:
    delta_model = deltatune.attach(build("llama").train(), deltatune.LoraConfig(r=4, target_modules="all-linear"))
    delta_model.gradient_checkpointing_enable()
    inputs = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = delta_model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_modules_to_save_trains_a_copy_of_the_head(tmp_path) -> None:
    delta_model = deltatune.attach(
        build("bert"), lora(target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    original = delta_model.base_model.classifier.weight.detach().clone()
    trainable = {n for n, p in delta_model.named_parameters() if p.requires_grad}
    assert any("classifier.deltatune" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in delta_model.parameters() if p.requires_grad], lr=0.1)
    run(delta_model, "bert").pow(2).sum().backward()
    optimizer.step()
    assert torch.equal(delta_model.base_model.classifier.weight, original)
    expected = run(delta_model, "bert")
    delta_model.save(tmp_path / "cls")
    torch.testing.assert_close(run(deltatune.load(build("bert"), tmp_path / "cls"), "bert"), expected, atol=0, rtol=0)


def test_delete_removes_every_trace_and_keeps_the_others() -> None:
    delta_model = deltatune.attach(build("llama"), lora(), name="a")
    delta_model.add("b", lora(target_modules=["q_proj"]))
    delta_model.activate("a", "b")
    delta_model.delete("b")
    assert delta_model.active_adapters == ("a",)
    assert all("b" not in site.adapters for _, site in delta_model.sites())
    delta_model.delete("a")
    assert list(delta_model.sites()) == []


def test_trainable_summary_counts_adapter_parameters() -> None:
    delta_model = deltatune.attach(build("mlp"), deltatune.LoraConfig(r=2, target_modules=["net.0"]))
    summary = delta_model.trainable_summary()
    assert summary.trainable == summary.per_adapter["default"] == 2 * 16 + 32 * 2
    assert "trainable" in str(summary)


def test_saving_several_adapters_writes_one_folder_each(tmp_path) -> None:
    delta_model = deltatune.attach(build("mlp"), deltatune.LoraConfig(r=2, target_modules=["net.0"]), name="a")
    delta_model.add("b", deltatune.BitFitConfig())
    delta_model.save(tmp_path / "both")
    loaded = deltatune.load(build("mlp"), tmp_path / "both")
    assert sorted(loaded.configs) == ["a", "b"]
    assert isinstance(loaded.configs["b"], deltatune.BitFitConfig)


def test_bitfit_beside_lora_adds_both_deltas() -> None:
    delta_model = deltatune.attach(build("bert"), lora(target_modules=["query"]), name="lora")
    delta_model.add("bias", deltatune.BitFitConfig(target_modules=["dense"]))
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("bias"):
            parameter.fill_(0.05)
    delta_model.activate("lora")
    only_lora = run(delta_model, "bert")
    delta_model.activate("lora", "bias")
    assert not torch.allclose(run(delta_model, "bert"), only_lora)


def test_bf16_model_runs_and_merges_in_float32() -> None:
    delta_model = deltatune.attach(build("llama").to(torch.bfloat16), lora())
    output = run(delta_model, "llama").float()
    delta_model.merge()
    assert delta_model.base_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(run(delta_model, "llama").float(), output, atol=0.1, rtol=0.05)


def test_delete_removes_the_adapter_everywhere_even_when_a_close_raises() -> None:
    delta_model = deltatune.attach(build("llama"), lora(target_modules=["q_proj", "v_proj"]), name="a")
    delta_model.add("b", lora(target_modules=["k_proj"]))
    expected_b = run(delta_model.activate("b"), "llama")
    delta_model.activate("a", "b")
    holders = [site for _, site in delta_model.sites() if "a" in site.adapters]
    failing = holders[len(holders) // 2].adapters["a"]

    def close() -> None:
        raise RuntimeError("close failed")

    failing.close = close
    with pytest.raises(deltatune.DeltaTuneError, match="'a'") as raised:
        delta_model.delete("a")
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert list(delta_model.records) == ["b"]
    assert delta_model.active_adapters == ("b",)
    assert all("a" not in site.adapters for _, site in delta_model.sites())
    torch.testing.assert_close(run(delta_model, "llama"), expected_b, atol=0, rtol=0)


@pytest.mark.parametrize("step", ["set_trainable", "_reactivate"])
def test_an_add_that_fails_after_placement_leaves_no_trace(step: str, monkeypatch) -> None:
    delta_model = deltatune.attach(build("llama"), lora(target_modules=["q_proj"]), name="a")
    expected = run(delta_model, "llama")

    def fail(*args, **kwargs) -> None:
        raise RuntimeError(f"{step} failed")

    monkeypatch.setattr(delta_model, step, fail)
    with pytest.raises(RuntimeError, match=step):
        delta_model.add("b", lora(target_modules=["k_proj"]))
    monkeypatch.undo()
    assert list(delta_model.records) == ["a"] and delta_model.active_adapters == ("a",)
    assert all("b" not in site.adapters for _, site in delta_model.sites())
    torch.testing.assert_close(run(delta_model, "llama"), expected, atol=0, rtol=0)
    delta_model.add("b", lora(target_modules=["k_proj"]))
