"""Per-call state belongs to its call: a forward call that raised inside the model (here: position ids
of the wrong length) leaves nothing behind that changes a later call, and no adapter keeps a tensor
of a finished call (an activation held on a module keeps its memory, and its graph, alive).

Covered: the adapters that note something in a pre-hook for their forward hook to read (prompt
tuning and P-tuning: positions to trim; prefix tuning: the cache it built; bottleneck adapters that
read the sublayer's input: that input)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune
from tiny_models import build

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIGS = {
    "prompt_tuning": lambda: deltatune.PromptTuningConfig(num_virtual_tokens=3),
    "p_tuning": lambda: deltatune.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "prefix_tuning": lambda: deltatune.PrefixTuningConfig(num_virtual_tokens=3),
    "bottleneck_parallel": lambda: deltatune.BottleneckConfig(preset="parallel", init_weights="bert"),
    "bottleneck_pfeiffer": lambda: deltatune.BottleneckConfig(preset="pfeiffer"),
}
GRID = [pytest.param(method, arch, id=f"{method}-{arch}") for method in CONFIGS for arch in ("llama", "bert")]
TOKENS = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
WRONG_POSITIONS = torch.arange(2)[None]
"""Position ids for 2 tokens where the input has 5: the model raises partway through the call."""


def adapted(method: str, arch: str, names: tuple[str, ...] = ("default",)) -> deltatune.DeltaModel:
    delta_model = deltatune.attach(build(arch), CONFIGS[method](), name=names[0])
    for name in names[1:]:
        delta_model.add(name, CONFIGS[method]())
    with torch.no_grad():
        for name in names:
            for parameter in delta_model.adapter_parameters(name):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return delta_model.eval()


def logits(model: nn.Module, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS, **extra).logits


def raise_inside(model: nn.Module, **extra) -> None:
    with pytest.raises(RuntimeError):  # the shapes of positions and tokens disagree inside the model
        logits(model, position_ids=WRONG_POSITIONS, **extra)


def held_tensors(value, path: str, depth: int = 0):
    """Paths of tensors (not parameters) reachable from `value` through containers and deltatune's or
    transformers' cache objects; modules are not entered (their parameters are not call state)."""
    if isinstance(value, nn.Parameter) or isinstance(value, nn.Module) or depth > 5:
        return
    if isinstance(value, torch.Tensor):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from held_tensors(item, f"{path}[{key!r}]", depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for index, item in enumerate(value):
            yield from held_tensors(item, f"{path}[{index}]", depth + 1)
    elif type(value).__module__.startswith(("deltatune", "transformers.cache_utils")) and hasattr(value, "__dict__"):
        for key, item in vars(value).items():
            yield from held_tensors(item, f"{path}.{key}", depth + 1)


def call_state(delta_model: deltatune.DeltaModel) -> list[str]:
    """Every tensor an adapter keeps outside its parameters and buffers."""
    found = []
    for module_name, site in delta_model.sites():
        for name, adapter in site.adapters.items():
            for key, value in vars(adapter).items():
                if not key.startswith("_"):
                    found += held_tensors(value, f"{module_name}[{name}].{key}")
    return found


@pytest.mark.parametrize("method,arch", GRID)
def test_a_call_that_raised_does_not_change_the_next_call(method: str, arch: str) -> None:
    delta_model = adapted(method, arch)
    expected = logits(delta_model)
    raise_inside(delta_model)
    torch.testing.assert_close(logits(delta_model), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_call_that_raised_does_not_change_a_later_mixed_batch(method: str) -> None:
    """The raised call ran adapter b alone; the mixed batch then runs a and b on their rows."""
    delta_model = adapted(method, "llama", names=("a", "b"))
    routes = ["a", "b"]
    expected = logits(delta_model, adapter_names=routes)
    delta_model.activate("b")
    raise_inside(delta_model)
    torch.testing.assert_close(logits(delta_model, adapter_names=routes), expected, atol=0, rtol=0)


@pytest.mark.parametrize("method,arch", GRID)
def test_no_adapter_keeps_a_tensor_of_a_finished_call(method: str, arch: str) -> None:
    delta_model = adapted(method, arch)
    raise_inside(delta_model)
    logits(delta_model)
    assert call_state(delta_model) == []


def test_per_row_routing_ends_with_its_call() -> None:
    """After a mixed-batch call, a direct call to an inner module runs the active adapters on every row."""
    delta_model = adapted("prompt_tuning", "llama", names=("a", "b")).activate("a")
    lora = deltatune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    delta_model.add("c", lora).activate("c")
    with torch.no_grad():
        expected = delta_model.model(input_ids=TOKENS).last_hidden_state
        delta_model(input_ids=TOKENS, adapter_names=["a", None])
        after = delta_model.model(input_ids=TOKENS).last_hidden_state
        delta_model.generate(input_ids=TOKENS, adapter_names=["c", None], max_new_tokens=1, do_sample=False)
        after_generate = delta_model.model(input_ids=TOKENS).last_hidden_state
    assert delta_model.routing.row_groups is None
    torch.testing.assert_close(after, expected, atol=0, rtol=0)
    torch.testing.assert_close(after_generate, expected, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_concurrent_calls_keep_their_own_notes(method: str) -> None:
    """Two threads call the model with inputs of different lengths; each gets its own call's output."""
    import threading

    delta_model = adapted(method, "llama")
    inputs = [torch.randint(3, 90, (3, 4)), torch.randint(3, 90, (1, 9))]
    with torch.no_grad():
        expected = [delta_model(input_ids=tokens).logits for tokens in inputs]
    wrong: list[str] = []

    def work(index: int) -> None:
        for _ in range(40):
            with torch.no_grad():
                out = delta_model(input_ids=inputs[index]).logits
            if out.shape != expected[index].shape or not torch.allclose(out, expected[index], atol=1e-5):
                wrong.append(f"thread {index}: {tuple(out.shape)}")

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert all(not notes for _, site in delta_model.sites() for notes in site._notes.values())


@pytest.mark.parametrize("method", ["bottleneck_parallel", "bottleneck_pfeiffer"])
def test_a_tapped_input_does_not_outlive_a_call_that_raised_before_its_reader(method: str) -> None:
    """The call raises inside the FFN, after the tap recorded x and before the adapter that reads it."""
    delta_model = adapted(method, "llama")
    first_ffn = delta_model.base_model.model.layers[0].mlp.gate_proj
    handle = first_ffn.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            logits(delta_model)
    finally:
        handle.remove()
    assert call_state(delta_model) == []
