"""Cross-check against AdapterHub `adapters` (runs where it is installed: the transformers 4.57 line).

AdapterHub builds its adapters on a copy of the same tiny model, its weights are randomised (so no
term of the math is zero), it saves its folder, and `deltatune.load` reads that folder onto the plain
model: the outputs must agree to 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")
from adapters import composition as adapterhub_composition  # noqa: E402

import deltatune  # noqa: E402
from tiny_models import build, run  # noqa: E402

ATOL = 1e-5


def adapterhub_model(arch: str) -> torch.nn.Module:
    model = copy.deepcopy(build(arch))
    adapters.init(model)
    return model


def randomize_adapterhub(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every adapter and fusion parameter AdapterHub added."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in (".adapters.", "shared_parameters.", "adapter_fusion_layer.")):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def adapterhub_output(model: torch.nn.Module, arch: str, setup, **kwargs) -> torch.Tensor:
    model.set_active_adapters(setup, **kwargs)
    model.eval()
    with torch.no_grad():
        return run(model, arch)


CONFIGS = {
    "double_seq_bn": lambda: "double_seq_bn",
    "seq_bn": lambda: "seq_bn",
    "par_bn": lambda: "par_bn",
    "compacter": lambda: adapters.CompacterConfig(reduction_factor=4),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_adapterhub_bottleneck_folder_gives_the_same_outputs(config_name: str, arch: str, tmp_path) -> None:
    reference = adapterhub_model(arch)
    reference.add_adapter("task", config=CONFIGS[config_name]())
    randomize_adapterhub(reference)
    expected = adapterhub_output(reference, arch, "task")
    reference.save_adapter(str(tmp_path / "task"), "task", use_safetensors=config_name == "par_bn")

    loaded = deltatune.load(build(arch), tmp_path / "task")
    assert loaded.active_adapters == ("task",)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, arch), expected, atol=ATOL, rtol=0)
        with loaded.disabled():
            assert not torch.allclose(run(loaded, arch), expected, atol=1e-3)


def test_pfeiffer_applies_the_pretrained_layer_norm_twice_like_adapterhub(tmp_path) -> None:
    """AdapterHub's seq_bn on post-LN BERT computes LN(A(LN(h + x)) + h + x); so do we. Feeding the
    adapter h instead (Houlsby's input) gives a different output: the difference is real."""
    reference = adapterhub_model("bert")
    reference.add_adapter("task", config="seq_bn")
    randomize_adapterhub(reference)
    expected = adapterhub_output(reference, "bert", "task")
    reference.save_adapter(str(tmp_path / "task"), "task")
    loaded = deltatune.load(build("bert"), tmp_path / "task")
    assert loaded.configs["task"].original_ln_before
    torch.testing.assert_close(run(loaded, "bert"), expected, atol=ATOL, rtol=0)
    for _, site in loaded.sites():
        site.adapters["task"].original_ln_before = False
    assert not torch.allclose(run(loaded, "bert"), expected, atol=1e-3)


def _two_houlsby_adapters(tmp_path, with_fusion: bool) -> torch.nn.Module:
    reference = adapterhub_model("bert")
    for name in ("first", "second"):
        reference.add_adapter(name, config="double_seq_bn")
    if with_fusion:
        reference.add_adapter_fusion(adapterhub_composition.Fuse("first", "second"))
    randomize_adapterhub(reference)
    for name in ("first", "second"):
        reference.save_adapter(str(tmp_path / name), name)
    return reference


def test_adapterhub_fusion_over_two_houlsby_adapters_gives_the_same_outputs(tmp_path) -> None:
    reference = _two_houlsby_adapters(tmp_path, with_fusion=True)
    expected = adapterhub_output(reference, "bert", adapterhub_composition.Fuse("first", "second"))
    reference.save_adapter_fusion(str(tmp_path / "fusion"), "first,second")

    loaded = deltatune.load(build("bert"), tmp_path)  # the two adapters, then the fusion
    assert isinstance(loaded.configs["fusion"], deltatune.FusionConfig)  # named after its folder
    loaded.activate(deltatune.Fuse("first", "second"))
    torch.testing.assert_close(run(loaded, "bert"), expected, atol=ATOL, rtol=0)


def test_adapterhub_stack_gives_the_same_outputs(tmp_path) -> None:
    reference = _two_houlsby_adapters(tmp_path, with_fusion=False)
    expected = adapterhub_output(reference, "bert", adapterhub_composition.Stack("first", "second"))
    loaded = deltatune.load(build("bert"), tmp_path)
    loaded.activate(deltatune.Stack("first", "second"))
    torch.testing.assert_close(run(loaded, "bert"), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("skip_layers", [[0], [1], [0, 1]])
def test_adapterhub_skip_layers_gives_the_same_outputs(skip_layers: list[int], tmp_path) -> None:
    reference = adapterhub_model("bert")
    reference.add_adapter("task", config="double_seq_bn")
    randomize_adapterhub(reference)
    expected = adapterhub_output(reference, "bert", "task", skip_layers=skip_layers)
    reference.save_adapter(str(tmp_path / "task"), "task")
    loaded = deltatune.load(build("bert"), tmp_path / "task")
    loaded.activate("task", skip_layers=skip_layers)
    torch.testing.assert_close(run(loaded, "bert"), expected, atol=ATOL, rtol=0)
