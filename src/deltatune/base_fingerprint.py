"""The fingerprint of the base weights an adapter was trained on, so that loading it onto another base is seen.

An adapter is recorded with the base it was added to (`DeltaModel.add`), one entry per adapted module
(the method's targets; `modules_to_save` copies are not the base's weights), except those inside a
classification or QA model's task head (`task_record.task_heads`: new, so random in each model loaded from
a plain encoder): `"<shape digest> <signs>"`.

- shape digest: the first 8 hex digits of SHA-256 over the module's parameters, each `name=d0xd1...` in
  sorted order, joined by `;`. The parameters are the module's own and its children's, deltatune's
  adapters left out; a quantized layer counts with its logical weight shape (out × in) and its bias, so
  a 4-bit layer and the full-precision layer it came from give one digest.
- signs: the sample. The module's parameters, sorted by name, each flattened row-major, are read as
  one vector v of N values; the sample is v[p_k], p_k = ⌊(2k + 1)·N / 2S⌋ for k = 0..S−1, S = min(32, N),
  each value written as its sign: `+`, `-` or `0`.
- orders: the sign of v[p_k] − v[q_k] at each sampled position, q_k = p_k + 1 (p_k − 1 at the last value;
  none for N = 1), written the same way. The positions depend on the shapes alone.

Why signs and orders, and not a hash of the values: rounding a float to another float dtype is monotone
and keeps zero, so it never turns a positive value negative nor puts two values in the other order (it may
make them equal). A float32 base saved in bfloat16 or float16 and loaded back (on any device) keeps every
sign and order, except that rounding may turn one into `0` (float16 rounds |x| < 2⁻²⁵ to zero; two close
values may round to one), and a `0` matches either. So two prints differ at a module only where a sampled
sign or order is `+` in one and `-` in the other. A hash of the values, even rounded, would change under
such round trips, and one of the modules would hide which modules differ. A model with other weights
(another checkpoint of the architecture, a fresh init) conflicts at about half of each module's orders, and
half of its signs where its values have both signs; the orders see the modules whose values are all positive
(every norm layer's weight, in every real checkpoint: their signs are all `+`). A fine-tuned copy of the
base differs only where a sampled sign or order changed, so a small fine-tune may go unseen.

A module holding a quantized layer has no signs (`shape digest` alone): its packed storage is not the
float base's values, and a QLoRA adapter must load onto its full-precision base silently. So on a
quantized base (bitsandbytes, quanto, torchao, GGUF blocks) the fingerprint checks module names and
shapes only.

A folder's record is `{"scheme": "deltatune-signs-orders-32", "modules": {module name: entry}}`; one that is not
of that form (`fingerprint_problem`) is refused where the folder is read (`folder_records`). Folders saved
before the orders were recorded hold scheme `deltatune-signs-32` (entries without orders): they are
compared by their signs.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from .errors import BaseWeightsError, BaseWeightsWarning
from .field_check import FullMatch, mapping_problem
from .quantized import quantized_linear
from .targeting import model_modules
from .task_record import task_heads

SAMPLE_SIZE = 32
SCHEME = "deltatune-signs-orders-32"
"""Names this way of taking the print."""
SCHEMES = (SCHEME, "deltatune-signs-32")
"""The schemes compared: this one, and the earlier one whose entries have no orders (a folder with another
scheme is not compared)."""
SIGNS = {1: "+", -1: "-", 0: "0"}
Entry = Annotated[
    str,
    FullMatch(
        rf"[0-9a-f]{{8}}( [-+0]{{0,{SAMPLE_SIZE}}}( [-+0]{{0,{SAMPLE_SIZE}}})?)?", "shape digests with their signs"
    ),
]
"""A module's entry: its shape digest, then (unless quantized) a space and its signs, then (this scheme) a
space and its orders."""


def fingerprint(model: nn.Module, module_names: list[str]) -> dict[str, object]:
    """The fingerprint of `model`'s modules `module_names`, its task heads' left out: `{"scheme": SCHEME,
    "modules": {name: entry}}`."""
    shapes: dict[str, str] = {}
    samples: dict[str, torch.Tensor] = {}
    heads = set(task_heads(model))
    for module_name in dict.fromkeys(module_names):
        if module_name.partition(".")[0] in heads:
            continue
        parameters, unreadable = _parameters(model.get_submodule(module_name))
        shapes[module_name] = _shape_digest(parameters)
        if not unreadable:
            samples[module_name] = _sample([tensor for _, tensor in parameters])
    sampled = _to_host(samples)
    return {
        "scheme": SCHEME,
        "modules": {
            name: f"{digest} {sampled[name]}" if name in sampled else digest for name, digest in shapes.items()
        },
    }


def fingerprint_problem(record: Any) -> str | None:
    """What is wrong with a fingerprint record read from a folder, None when nothing is: a mapping with a
    string `scheme` and, under this scheme, `modules`: {module name: `Entry`} (another scheme's record is
    not compared, so not read further)."""
    problem = mapping_problem(record, {"scheme": str}, required=("scheme",))
    if problem is None and record["scheme"] in SCHEMES:
        problem = mapping_problem(record, {"modules": dict[str, Entry]}, required=("modules",))
    return problem


def differing_modules(recorded: Mapping[str, object], current: Mapping[str, object]) -> list[str] | None:
    """The modules at which two fingerprints differ (in `recorded`'s order, then those only `current` has);
    None when they cannot be compared (another scheme)."""
    if recorded.get("scheme") not in SCHEMES or current.get("scheme") not in SCHEMES:
        return None
    old, new = dict(recorded.get("modules", {})), dict(current.get("modules", {}))
    differ = [name for name, entry in old.items() if name not in new or not _same_module(entry, new[name])]
    return differ + [name for name in new if name not in old]


def _same_module(recorded: str, current: str) -> bool:
    """Same shapes, and no sampled sign or order `+` in one and `-` in the other (where both have them: a
    quantized layer has neither, an earlier scheme's entry no orders)."""
    old_digest, *old_samples = recorded.split(" ")
    new_digest, *new_samples = current.split(" ")
    return old_digest == new_digest and all(
        len(old) == len(new) and not any({a, b} == {"+", "-"} for a, b in zip(old, new))
        for old, new in zip(old_samples, new_samples)
    )


def _parameters(module: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], bool]:
    """(the parameters of `module` and its children, by sorted name, without deltatune's adapters; whether
    their values cannot be sampled: a quantized layer, or weights not materialised). A quantized layer's
    packed weight (a parameter, or GGUF's buffer) is listed as a meta tensor of its logical shape."""
    found: dict[str, torch.Tensor] = {}
    unreadable = False
    for prefix, child in model_modules(module):
        own = dict(child.named_parameters(recurse=False))
        row = quantized_linear(child)
        if row is not None:
            unreadable = True
            for name in row.quantized_parameters:
                own[name] = torch.empty(row.out_features(child), row.in_features(child), device="meta")
        for name, tensor in own.items():
            unreadable = unreadable or tensor.is_meta
            found[f"{prefix}.{name}" if prefix else name] = tensor
    return sorted(found.items()), unreadable


def _shape_digest(parameters: list[tuple[str, torch.Tensor]]) -> str:
    text = ";".join(f"{name}={'x'.join(map(str, tensor.shape))}" for name, tensor in parameters)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _sample(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The signs, then the orders (int8, on the tensors' device), of the sample of the tensors read as one
    flat vector."""
    total = sum(tensor.numel() for tensor in tensors)
    size = min(SAMPLE_SIZE, total)
    positions = [(2 * k + 1) * total // (2 * size) for k in range(size)]
    neighbours = [position + 1 if position + 1 < total else position - 1 for position in positions] if total > 1 else []
    values = _values_at(tensors, positions + neighbours)
    sampled, beside = values[: len(positions)], values[len(positions) :]
    signs = torch.sign(sampled)
    orders = torch.sign(sampled[: len(beside)] - beside)
    return torch.cat([signs, orders]).to(torch.int8)


def _values_at(tensors: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
    """The values at `positions` of the tensors read as one flat vector, in the order given, as float32 (which
    every device has; a float64 order it cannot hold becomes a tie, which matches either order)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    values = torch.empty(len(positions), dtype=torch.float32, device=device)
    start = 0
    for tensor in tensors:
        inside = [index for index, position in enumerate(positions) if start <= position < start + tensor.numel()]
        if inside:
            flat = tensor.detach().reshape(-1)
            offsets = torch.tensor([positions[index] - start for index in inside], device=flat.device)
            values[torch.tensor(inside, device=device)] = flat[offsets].to(device=device, dtype=torch.float32)
        start += tensor.numel()
    return values


def _to_host(samples: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each module's sampled signs and orders as `+`, `-` and `0`, the two strings joined by a space, read
    from the devices in one copy per device."""
    by_device: dict[torch.device, list[str]] = {}
    for name, values in samples.items():
        by_device.setdefault(values.device, []).append(name)
    sampled: dict[str, str] = {}
    for names in by_device.values():
        flat = torch.cat([samples[name] for name in names]).cpu().tolist()
        start = 0
        for name in names:
            count = samples[name].numel()
            text = "".join(SIGNS[value] for value in flat[start : start + count])
            signs = (count + 1) // 2  # as many signs as orders, but one order less for a single value
            sampled[name] = f"{text[:signs]} {text[signs:]}"
            start += count
    return sampled


def check_same_base(
    recorded: Mapping[str, object] | None,
    current: Mapping[str, object],
    adapter: str,
    source: Path,
    base_model: str | None,
    strict: bool,
) -> None:
    """Warn (raise `BaseWeightsError` if `strict`) when the fingerprint a folder records differs from the
    base's; silent for a folder that records none (older saves) or the same base."""
    differ = differing_modules(recorded, current) if recorded else None
    if not differ:
        return
    shown = ", ".join(differ[:3]) + (", ..." if len(differ) > 3 else "")
    trained_on = f" ({base_model})" if base_model else ""
    message = (
        f"adapter {adapter!r} from {source} was trained on other base weights than this model's: "
        f"{len(differ)} of its {len(recorded.get('modules', {}))} adapted modules differ ({shown}); load it onto "
        f"the model it was trained on{trained_on}, or train it again on this one"
    )
    if strict:
        raise BaseWeightsError(message + "; nothing was loaded")
    warnings.warn(message + " (strict=True refuses such a load)", BaseWeightsWarning, stacklevel=6)
