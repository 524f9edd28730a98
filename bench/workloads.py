"""The measured workloads, run in fresh worker processes:

    python bench/workloads.py WORKLOAD LIBRARY '{"quick": false, ...}'        → one JSON line on stdout
    python bench/workloads.py WORKLOAD LIB1,LIB2 '{"quick": false, ...}'      (paired timing)
    python bench/workloads.py WORKLOAD LIB '{...}' LIB1,LIB2 '{...}' ...     (several runs, a line each: quick mode)

With one library the worker times it and measures the peak memory its calls add, so that memory and
allocator state never leak from one library into the other. With several, each library gets its own
model in the one process and their calls alternate (A B, B A, A B, ...), so that every library meets
the same machine load: the ratios come from these paired timings. Every library gets the same model
(same seed or the same checkpoint), the same adapter shapes and the same inputs.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import (  # noqa: E402
    current_memory_bytes,
    peak_memory_bytes,
    reset_peak_memory,
    time_calls,
    time_interleaved,
    touch_memory,
)
from models import LINEAR_LAYERS, causal_lm, checkpoint_causal_lm, labels_for, minilm, token_batch  # noqa: E402

BATCH, LENGTH = 8, 64
Calls = dict[str, Callable[[], object]]
"""A prepared workload: timing name ("seconds", ...) → the call to time."""


def lora_model(
    library: str,
    model: torch.nn.Module,
    dropout: float,
    names: list[str] = ("default",),
    rank: int = 16,
    **options: object,
) -> torch.nn.Module:
    """The model with one LoRA adapter per name on all seven linear layers, the first one active; `options`:
    more config keywords both libraries take (`velora_config`)."""
    if library == "deltatune":
        import deltatune

        delta_model = None
        for name in names:
            config = deltatune.LoraConfig(
                r=rank,
                lora_alpha=2 * rank,
                lora_dropout=dropout,
                target_modules=LINEAR_LAYERS,
                init_lora_weights=False,
                **options,
            )
            delta_model = (
                deltatune.attach(model, config, name) if delta_model is None else delta_model.add(name, config)
            )
        return delta_model
    import peft

    peft_model = None
    for name in names:
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=dropout,
            target_modules=LINEAR_LAYERS,
            init_lora_weights=False,
            **options,
        )
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    peft_model.set_adapter(names[0])
    return peft_model


def train(library: str, options: dict[str, Any]) -> Calls:
    """One LoRA training step: forward, loss, backward, AdamW step. With a `quantize` option the model
    is loaded from its checkpoint as a user loads it: quantized (`quantize` names the method, e.g.
    nf4) or, for `quantize: null`, in float32. With `checkpointing`, each library recomputes the
    activations in backward as its users turn it on (`gradient_checkpointing_on`). With
    `release_freed_memory`, the process takes the C heap policy `deltatune train` applies
    (`deltatune.train.allocator`: before the load, and a trim after it), whichever library it measures:
    it is the process's, not a library's."""
    if options.get("release_freed_memory"):
        from deltatune.train.allocator import release_freed_memory

        release_freed_memory()
    model = (
        checkpoint_causal_lm(options["quick"], options["quantize"])
        if "quantize" in options
        else causal_lm(options["quick"])
    ).train()
    if options.get("release_freed_memory"):
        from deltatune.train.allocator import return_free_heap_pages

        return_free_heap_pages()  # as the trainer does once its model is loaded
    input_ids = token_batch(model, BATCH, LENGTH)
    labels = labels_for(input_ids, options.get("labelled_tail"))
    step = lora_step(
        library,
        model,
        options["dropout"],
        input_ids,
        labels,
        options.get("checkpointing", False),
        options.get("release_freed_memory", False),
    )
    return {"seconds": step}


def lora_step(
    library: str,
    model: torch.nn.Module,
    dropout: float,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    checkpointing: bool = False,
    trim: bool = False,
) -> Callable[[], None]:
    """A LoRA training step on `model` (forward, loss, backward, AdamW), each library with its own loss:
    deltatune's `causal_lm_loss` (the LM head only at labelled positions, in chunks of its default
    rows), peft's the model's own; deltatune's gated MLP blocks lean, as its trainer trains them
    (`lean_gated_mlp`). `trim`: the heap trimmed after each step, as the trainer does under
    `release_freed_memory` (the process's policy, so for either library)."""
    from deltatune.train.allocator import return_free_heap_pages

    if checkpointing:
        model = gradient_checkpointing_on(library, model)
    wrapped = lora_model(library, model, dropout)
    if checkpointing and library == "deltatune":
        wrapped.gradient_checkpointing_enable()
    if library == "deltatune":
        from deltatune.gated_mlp import enable_lean_gated_mlp

        enable_lean_gated_mlp(wrapped)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    loss_of = (
        _sparse_loss(wrapped) if library == "deltatune" else lambda: wrapped(input_ids=input_ids, labels=labels).loss
    )

    def step() -> None:
        loss_of(input_ids, labels).backward() if library == "deltatune" else loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if trim:
            return_free_heap_pages()

    return step


def gradient_checkpointing_on(library: str, model: torch.nn.Module) -> torch.nn.Module:
    """The base prepared for checkpointed training as each library's users do it, before the adapter:
    deltatune as its trainer does (`prepare_quantized_base(model, gradient_checkpointing=True)`, then
    `DeltaModel.gradient_checkpointing_enable()` once attached); peft's QLoRA recipe on a quantized base
    (`prepare_model_for_kbit_training`, which turns checkpointing on), and on a float32 one transformers'
    `gradient_checkpointing_enable()` with `enable_input_require_grads()`, as peft's guide shows."""
    if library == "deltatune":
        import deltatune

        deltatune.prepare_quantized_base(model, gradient_checkpointing=True)
        return model
    import peft

    if getattr(model, "is_quantized", False):
        return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    return model


def _sparse_loss(wrapped: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """deltatune's training loss: the LM head only at labelled positions."""
    from deltatune.losses import causal_lm_loss

    return lambda input_ids, labels: causal_lm_loss(wrapped, input_ids, None, labels)


def inference(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return call()

    return run


def forward(library: str, options: dict[str, Any]) -> Calls:
    """Inference forward of the whole batch, one adapter unmerged (or none: library "base")."""
    model = causal_lm(options["quick"]).eval()
    wrapped = (model if library == "base" else lora_model(library, model, 0.0)).eval()
    input_ids = token_batch(model, BATCH, LENGTH)
    return {"seconds": inference(lambda: wrapped(input_ids=input_ids))}


def mixed(library: str, options: dict[str, Any]) -> Calls:
    """Four adapters, two rows each, in one forward; and the same batch with one adapter, for scale."""
    names = ["a", "b", "c", "d"]
    model = causal_lm(options["quick"]).eval()
    wrapped = lora_model(library, model, 0.0, names).eval()  # peft leaves new layers in training mode
    input_ids = token_batch(model, BATCH, LENGTH)
    rows = [name for name in names for _ in range(BATCH // len(names))]
    return {
        "seconds": inference(lambda: wrapped(input_ids=input_ids, adapter_names=rows)),
        "single_seconds": inference(lambda: wrapped(input_ids=input_ids)),
    }


def add_and_merge(library: str, options: dict[str, Any]) -> dict[str, Any]:
    """Seconds to add adapters 1..N (r=16, all seven linear layers), then to merge one into the weights.

    The worker first touches and frees 3 GiB: on a virtual machine the first touch of guest memory
    never used before costs far more than a reused page (here an add's ~4,960 page faults took 0.047 s
    on reused pages and 0.11 s on fresh ones, after ~1.3 GB), which would time the machine's history
    rather than the library."""
    count = options["adapters"]
    touch_memory(0 if options["quick"] else 3 << 30)
    model = causal_lm(options["quick"]).eval()
    wrapped = lora_model(library, model, 0.0)
    add_seconds = []
    for index in range(1, count):
        start = time.perf_counter()
        _add(library, wrapped, f"extra{index}")
        add_seconds.append(time.perf_counter() - start)
    first = _first_add_seconds(library, options)
    start = time.perf_counter()
    wrapped.merge() if library == "deltatune" else wrapped.base_model.merge_adapter()
    return {
        "first_add_seconds": first,
        "last_add_seconds": sorted(add_seconds[-5:])[2],
        "adapters": count,
        "merge_seconds": time.perf_counter() - start,
    }


def _first_add_seconds(library: str, options: dict[str, Any]) -> float:
    """Median of five first adds, each onto a fresh model (deltatune: `add` on a new DeltaModel;
    peft: `get_peft_model`, which is its first add)."""
    seconds = []
    for _ in range(5):
        model = causal_lm(options["quick"]).eval()
        if library == "deltatune":
            import deltatune

            wrapped = deltatune.DeltaModel(model)
            start = time.perf_counter()
            _add(library, wrapped, "default")
        else:
            start = time.perf_counter()
            lora_model(library, model, 0.0)
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[2]


def _add(library: str, wrapped: torch.nn.Module, name: str) -> None:
    if library == "deltatune":
        import deltatune

        wrapped.add(name, deltatune.LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR_LAYERS))
    else:
        import peft

        wrapped.add_adapter(name, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR_LAYERS))


def floor(model: torch.nn.Module) -> torch.nn.Module:
    """The least work of any adapter training step: the frozen model with one trainable scalar on the
    output of its first sublayer (block 0's attention), so that the backward pass runs through every
    block, as it must for an adapter (or prefix) there, and the adapter itself costs nothing."""
    from deltatune.architectures import sublayer_sites

    model.requires_grad_(False)
    gate = torch.nn.Parameter(torch.ones((), dtype=next(model.parameters()).dtype))
    model.register_parameter("floor_gate", gate)
    model.get_submodule(sublayer_sites(model, None)[0].output).register_forward_hook(
        lambda module, args, output: output * gate
    )
    return model


def _houlsby_deltatune(model: torch.nn.Module) -> torch.nn.Module:
    import deltatune

    return deltatune.attach(model, deltatune.BottleneckConfig(preset="houlsby"))


def _houlsby_adapterhub(model: torch.nn.Module) -> torch.nn.Module:
    import adapters

    adapters.init(model)
    model.add_adapter("houlsby", config="double_seq_bn")
    model.train_adapter("houlsby")
    return model


def _prefix_deltatune(model: torch.nn.Module) -> torch.nn.Module:
    import deltatune

    return deltatune.attach(model, deltatune.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True))


def _prefix_peft(model: torch.nn.Module) -> torch.nn.Module:
    import peft

    return peft.get_peft_model(
        model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=True)
    )


def _adapter_step(wrapped: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss_of(wrapped).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def houlsby(library: str, options: dict[str, Any]) -> Calls:
    """One training step of a Houlsby adapter (reduction 16, swish) on all-MiniLM-L6-v2, batch 32×64;
    every library minimises the same loss on the same last hidden states."""
    model = minilm(options["quick"]).train()
    wrapped = {"deltatune": _houlsby_deltatune, "adapterhub": _houlsby_adapterhub, "floor": floor}[library](model)
    input_ids = token_batch(model, 32, 64)
    return {
        "seconds": _adapter_step(wrapped, lambda wrapped: wrapped(input_ids=input_ids).last_hidden_state.pow(2).mean())
    }


def prefix(library: str, options: dict[str, Any]) -> Calls:
    """One training step of prefix tuning (20 virtual tokens, MLP reparametrisation) on SmolLM2,
    batch 8×64, labels on every token, the model's own loss in every library."""
    model = causal_lm(options["quick"]).train()
    wrapped = {"deltatune": _prefix_deltatune, "peft": _prefix_peft, "floor": floor}[library](model)
    input_ids = token_batch(model, BATCH, LENGTH)
    return {"seconds": _adapter_step(wrapped, lambda wrapped: wrapped(input_ids=input_ids, labels=input_ids).loss)}


LIBRARY_MODULES = ("deltatune", "deltatune.losses", "peft", "adapters", "bitsandbytes")


def memory_after_imports() -> int:
    """The resident memory once every library a workload may use is imported (the same set whichever
    library the worker measures), with the high-water mark restarted there: the base of
    `peak_with_load_bytes`, the peak over building the model and its timed calls."""
    import importlib
    import importlib.util

    for name in LIBRARY_MODULES:  # a module imported before may have no spec (adapters' lazy module)
        top = name.split(".")[0]
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            importlib.import_module(name)
    gc.collect()
    reset_peak_memory()
    return current_memory_bytes()


TIMED: dict[str, Callable[[str, dict[str, Any]], Calls]] = {
    "train": train,
    "forward": forward,
    "mixed": mixed,
    "houlsby": houlsby,
    "prefix": prefix,
}
EVENTS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {"add_and_merge": add_and_merge}
"""Workloads that time one-off events themselves (no repeated calls)."""


def run(workload: str, libraries: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """One library: its timings and peak memory. Several: their paired timings, {library: {...}}."""
    if workload in EVENTS:
        return EVENTS[workload](libraries[0], options)
    if len(libraries) == 1:
        before_load = memory_after_imports()
        calls = TIMED[workload](libraries[0], options)
        load_peak = peak_memory_bytes()
        gc.collect()
        loaded = max(current_memory_bytes() - before_load, 0)
        timings = {name: time_calls(call, options["warmup"], options["repeats"]) for name, call in calls.items()}
        calls_peak = peak_memory_bytes()  # the high-water mark since the calls began, the model resident
        return {
            **timings["seconds"],
            **{name: timing["seconds"] for name, timing in timings.items() if name != "seconds"},
            # Linux batches resident-page counts per thread: a reading may lag the last by a few pages.
            "peak_with_load_bytes": max(load_peak, calls_peak, before_load) - before_load,
            "resident_after_load_bytes": loaded,
            "step_peak_with_weights_bytes": max(calls_peak - before_load, 0),
        }
    prepared = {library: TIMED[workload](library, options) for library in libraries}
    flat = {(library, name): call for library, calls in prepared.items() for name, call in calls.items()}
    timings = time_interleaved(flat, options["warmup"], options["repeats"])
    results = {}
    for library, calls in prepared.items():
        results[library] = {"seconds_min": min(timings[(library, "seconds")]["seconds_all"])}
        for name in calls:
            results[library] |= {
                name: timings[(library, name)]["seconds"],
                f"{name}_all": timings[(library, name)]["seconds_all"],
            }
    return results


if __name__ == "__main__":
    workload, pairs = sys.argv[1], sys.argv[2:]
    for libraries, options in zip(pairs[::2], map(json.loads, pairs[1::2])):
        torch.set_num_threads(options["threads"])
        torch.manual_seed(0)
        print(json.dumps(run(workload, libraries.split(","), options)), flush=True)
