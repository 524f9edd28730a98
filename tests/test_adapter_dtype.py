"""On a float16 / bfloat16 base, adapters keep float32 weights (peft's `autocast_adapter_dtype`), so
small optimizer updates do not round away; every built-in method runs, trains and mixes batches with
them, and merges them into the half-precision weights. `autocast_adapter_dtype=False` opts out.

The cases are the invariant table's (`test_invariants.CASES`), on its tiny transformers models in
bfloat16 (the plain MLP takes float32 inputs).
"""

from __future__ import annotations

import pytest
import torch

import deltatune
from test_invariants import CASES, base_state, grid, randomize
from tiny_models import build, run

BF16_GRID = [param for param in grid(lambda case: not case.keeps_model_dtype) if param.values[1] != "mlp"]
BF16_MIXED_GRID = [param for param in BF16_GRID if CASES[param.values[0]].mixed_batch]
MERGEABLE = [
    pytest.param(method, id=method)
    for method, case in CASES.items()
    if case.mergeable and "llama" in case.archs and not case.keeps_model_dtype
]


def bf16_attached(method: str, arch: str = "llama", name: str = "a", seed: int = 1, **options) -> deltatune.DeltaModel:
    delta_model = deltatune.attach(build(arch).to(torch.bfloat16), CASES[method].config(arch), name=name, **options)
    randomize(delta_model, name, seed)
    return delta_model


def base_dtype_output(arch: str = "llama") -> torch.Tensor:
    return run(build(arch).to(torch.bfloat16).requires_grad_(False), arch)


def assert_small_steps_change_every_tensor(
    delta_model: deltatune.DeltaModel, names: list[str], arch: str = "llama"
) -> None:
    """One Adam step of 1e-5 (far below bfloat16's resolution at 0.1, 4e-4) changes every trainable tensor."""
    parameters = [
        parameter for name in names for parameter in delta_model.adapter_parameters(name) if parameter.requires_grad
    ]
    before = [parameter.detach().clone() for parameter in parameters]
    optimizer = torch.optim.Adam(parameters, lr=1e-5)
    delta_model.train()
    run(delta_model, arch).float().pow(2).mean().backward()
    optimizer.step()
    delta_model.eval()
    assert all(parameter.grad.dtype == torch.float32 for parameter in parameters)
    unchanged = [
        index for index, (old, parameter) in enumerate(zip(before, parameters)) if torch.equal(old, parameter.detach())
    ]
    assert not unchanged, f"{len(unchanged)} of {len(parameters)} adapter tensors did not change"


@pytest.mark.parametrize("method,arch", BF16_GRID)
def test_adapters_on_a_bfloat16_model_keep_float32_weights_and_train(method: str, arch: str) -> None:
    delta_model = bf16_attached(method, arch)
    assert {parameter.dtype for parameter in delta_model.adapter_parameters("a")} == {torch.float32}
    expected_dtype = base_dtype_output(arch).dtype
    with torch.no_grad():
        assert run(delta_model, arch).dtype == expected_dtype
    assert run(delta_model.train(), arch).dtype == expected_dtype
    assert_small_steps_change_every_tensor(delta_model, ["a"], arch)


@pytest.mark.parametrize("method,arch", BF16_MIXED_GRID)
def test_mixed_batch_rows_on_a_bfloat16_model_equal_separate_runs(method: str, arch: str) -> None:
    delta_model = bf16_attached(method, arch)
    delta_model.add("b", CASES[method].config(arch))
    randomize(delta_model, "b", seed=2)
    assert {parameter.dtype for name in ("a", "b") for parameter in delta_model.adapter_parameters(name)} == {
        torch.float32
    }
    separate = {}
    for name in ("a", "b"):
        delta_model.activate(name)
        separate[name] = run(delta_model, arch)
    separate[None] = base_dtype_output(arch)
    mixed = run(delta_model, arch, adapter_names=["a", "b", None])
    assert mixed.dtype == separate[None].dtype
    for row, name in enumerate(["a", "b", None]):
        torch.testing.assert_close(mixed[row].float(), separate[name][row].float(), atol=0.05, rtol=0.02)


def test_fusion_on_a_bfloat16_model_keeps_float32_weights_and_trains() -> None:
    delta_model = bf16_attached("bottleneck", name="a")
    delta_model.add("b", CASES["bottleneck"].config("llama"))
    randomize(delta_model, "b", seed=2)
    delta_model.fuse("a", "b")
    assert {parameter.dtype for parameter in delta_model.adapter_parameters("a,b")} == {torch.float32}
    assert run(delta_model, "llama").dtype == base_dtype_output().dtype
    assert_small_steps_change_every_tensor(delta_model, ["a,b"])


@pytest.mark.parametrize("method", MERGEABLE)
def test_float32_adapter_merges_into_bfloat16_weights(method: str) -> None:
    delta_model = bf16_attached(method)
    assert {parameter.dtype for parameter in delta_model.adapter_parameters("a")} == {torch.float32}
    expected = run(delta_model, "llama").float()
    delta_model.merge()
    assert {tensor.dtype for tensor in base_state(delta_model.base_model).values() if tensor.is_floating_point()} == {
        torch.bfloat16
    }
    torch.testing.assert_close(run(delta_model, "llama").float(), expected, atol=0.1, rtol=0.05)
    delta_model.unmerge()
    torch.testing.assert_close(run(delta_model, "llama").float(), expected, atol=0.1, rtol=0.05)


def test_modules_to_save_copy_keeps_the_module_dtype() -> None:
    """As in peft: the copy runs in the module's place, on its inputs, so it keeps the module's dtype."""
    config = deltatune.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    delta_model = deltatune.attach(build("llama").to(torch.bfloat16), config)
    lora = delta_model.base_model.model.layers[0].self_attn.q_proj.deltatune.adapters["default"]
    head_copy = delta_model.base_model.lm_head.deltatune.adapters["default"]
    assert {parameter.dtype for parameter in lora.parameters()} == {torch.float32}
    assert {parameter.dtype for parameter in head_copy.parameters()} == {torch.bfloat16}
    assert run(delta_model, "llama").dtype == base_dtype_output().dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_model_dtype(dtype: torch.dtype) -> None:
    config = lambda: deltatune.LoraConfig(r=2, target_modules=["net.0", "net.2"])  # noqa: E731
    delta_model = deltatune.attach(build("mlp").to(dtype), config(), name="kept", autocast_adapter_dtype=False)
    delta_model.add("float32", config())
    assert {parameter.dtype for parameter in delta_model.adapter_parameters("kept")} == {dtype}
    assert {parameter.dtype for parameter in delta_model.adapter_parameters("float32")} == {torch.float32}
    inputs = torch.randn(3, 16).to(dtype)
    assert delta_model(inputs, adapter_names=["kept", "float32", None]).dtype == dtype


def test_load_onto_a_bfloat16_model_keeps_the_saved_float32_weights(tmp_path) -> None:
    trained = deltatune.attach(build("llama"), CASES["lora"].config("llama"))
    randomize(trained, "default", seed=3)
    trained.save(tmp_path / "adapter")
    saved = [parameter.detach() for parameter in trained.adapter_parameters("default")]
    loaded = deltatune.load(build("llama").to(torch.bfloat16), tmp_path / "adapter")
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(loaded.adapter_parameters("default"), saved))
    kept = deltatune.load(build("llama").to(torch.bfloat16), tmp_path / "adapter", autocast_adapter_dtype=False)
    assert {parameter.dtype for parameter in kept.adapter_parameters("default")} == {torch.bfloat16}
