"""Checkpoints that resume bit-exactly, without pickle.

`OUTPUT/checkpoints/step-000040/` holds:
- `adapter/`: the adapter folder (as `DeltaModel.save` writes it), to use or ship;
- `trainable.safetensors`: every trainable parameter by its full name, for resuming (exact for every
  method, also those whose adapter files keep less than what trains, such as P-tuning's encoder);
- `optimizer.safetensors`: every tensor of the optimizer state, keyed `state.<param index>.<name>`;
- `random.safetensors`: the CPU (and CUDA) random generator states, of every rank in a launched run;
- `adapter_buffers.safetensors`, where adapters hold persistent buffers (VeLoRA's projection vector, set
  from the first batch): those buffers by their full names; a checkpoint without it keeps the rebuilt ones;
- `step_state.safetensors`, for a method with a step hook (`step_hooks.py`; AdaLoRA's importance scores
  and kept triplets): the hooks' state;
- `trainer_state.json`: the step, the optimizer's parameter groups, the scheduler state, the
  loss / metric history so far, and the run it belongs to (`fingerprint.py`). Written last, so a
  checkpoint without it is incomplete and skipped. Strict JSON (a non-finite number is null). A
  rewrite of an existing step folder (a resumed run reaching that step again) removes it first, so
  until the new one is in place the folder is incomplete, never new files beside the old state.

Resuming restores all of them; the data order is a function of (seed, epoch), so the run continues
with the same batches, the same dropout masks and the same optimizer moments as one never stopped.
With `save_total_limit` only the newest checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ..adapter_tensors import non_finite
from ..atomic import json_writer, safetensors_writer, write_files
from ..errors import DeltaTuneError, TrainingDivergedError
from . import sharding
from .report import finite_json

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RANDOM_FILE = "random.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
STEP_STATE_FILE = "step_state.safetensors"
BUFFERS_FILE = "adapter_buffers.safetensors"
ADAPTER_FOLDER = "adapter"
CHECKPOINTS_FOLDER = "checkpoints"
RANK_PREFIX = "rank"
"""`random.safetensors` keys of rank r > 0 of a launched run begin `rank<r>.`."""


@dataclass
class TrainerState:
    """Where a run stands: optimizer steps done, what has been recorded, and which run it is (the
    record `fingerprint.run_record` makes)."""

    step: int = 0
    history: list[dict[str, float]] | None = None
    run: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.history = self.history or []


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS_FOLDER / f"step-{step:06d}"


def save_checkpoint(
    folder: Path,
    delta_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    write: bool = True,
    step_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write checkpoint `folder` if `write` (rank 0 of a launched run). Every rank calls it: under FSDP
    the shards of the adapter and of the optimizer state are gathered first, so the files hold whole
    tensors, as a single-process run writes them. `step_state`: the step hooks' state, if any."""
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": sharding.full(value)
        for index, entries in optimizer_state["state"].items()
        for name, value in entries.items()
    }
    generators = _random_states()
    with sharding.whole_adapter(delta_model):
        if write:
            _write_checkpoint(folder, delta_model, optimizer_state, tensors, generators, scheduler, state, step_state)


def _write_checkpoint(
    folder: Path,
    delta_model: Any,
    optimizer_state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    generators: dict[str, torch.Tensor],
    scheduler: Any,
    state: TrainerState,
    step_state: dict[str, torch.Tensor] | None,
) -> None:
    (folder / STATE_FILE).unlink(missing_ok=True)
    delta_model.save(str(folder / ADAPTER_FOLDER))
    trainer_state = {
        "step": state.step,
        "history": state.history,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "run": state.run,
    }
    step_files = {STEP_STATE_FILE: safetensors_writer(step_state)} if step_state else {}
    buffers = dict(adapter_buffers(delta_model))
    step_files |= {BUFFERS_FILE: safetensors_writer(buffers)} if buffers else {}
    write_files(
        folder,
        {
            TRAINABLE_FILE: safetensors_writer(dict(trainable_parameters(delta_model))),
            OPTIMIZER_FILE: safetensors_writer(tensors),
            RANDOM_FILE: safetensors_writer(generators),
            **step_files,
            STATE_FILE: json_writer(finite_json(trainer_state)),
        },
    )


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, by step."""
    found = [
        path
        for path in (output_dir / CHECKPOINTS_FOLDER).glob("step-*")
        if path.name[5:].isdigit() and (path / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: int(path.name[5:]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, if any."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Remove all but the `keep` newest complete checkpoints."""
    found = complete_checkpoints(output_dir)
    for folder in found[: max(0, len(found) - keep)]:
        shutil.rmtree(folder)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The `trainer_state.json` of checkpoint `folder` (a clear error when it is not a checkpoint)."""
    if not (folder / STATE_FILE).is_file():
        raise DeltaTuneError(
            f"{folder} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint folder or the output folder"
        )
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(folder: Path, delta_model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and random state from `folder` (under FSDP every
    rank calls it, and takes its shards of the whole tensors)."""
    saved = read_trainer_state(folder)
    trainable = _finite_file(folder / TRAINABLE_FILE)
    buffers = _finite_file(folder / BUFFERS_FILE) if (folder / BUFFERS_FILE).is_file() else {}
    tensors = _finite_file(folder / OPTIMIZER_FILE)  # all checked before the first copy
    _load_trainable(delta_model, trainable)
    if buffers:
        _load_buffers(delta_model, buffers)
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = sharding.shard_like(value, parameters[int(index)])
    groups = [
        {**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in saved["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(saved["scheduler"])
    _restore_random_states(load_file(str(folder / RANDOM_FILE)))
    return TrainerState(step=saved["step"], history=saved["history"])


def read_step_state(folder: Path) -> dict[str, torch.Tensor]:
    """The step hooks' state saved in checkpoint `folder` (empty if it has none)."""
    path = folder / STEP_STATE_FILE
    return _finite_file(path) if path.is_file() else {}


def _finite_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint file `path`, refused, naming the first, where one holds NaN or ±inf: a run
    resumed from them would not train (an exp_avg_sq of inf makes every AdamW update 0) or would diverge."""
    tensors = load_file(str(path))
    bad = next((key for key in sorted(tensors) if non_finite(tensors[key])), None)
    if bad is not None:
        raise TrainingDivergedError(
            f"--resume: {path} holds non-finite values (NaN or inf) in {bad!r}, so the run was not resumed from "
            f"{path.parent}: the run that wrote it diverged or the file is damaged; resume from an earlier checkpoint "
            "(--resume FOLDER), or train afresh with overwrite_output_dir=true"
        )
    return tensors


def _random_states() -> dict[str, torch.Tensor]:
    """The random generator states (CPU, each CUDA device) of every rank: rank 0's as `cpu`,
    `cuda.<i>`, rank r's under `rank<r>.`. Each rank draws its own dropout masks from its own state,
    which moves on by a number of draws that depends on its batches, so each is kept. In a launched
    run every rank calls this (a gather)."""
    own = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        own.update({f"cuda.{index}": value for index, value in enumerate(torch.cuda.get_rng_state_all())})
    if not (dist.is_available() and dist.is_initialized()):
        return own
    every: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, own)
    return {_rank_prefix(rank) + key: value for rank, states in enumerate(every) for key, value in states.items()}


def _restore_random_states(generators: dict[str, torch.Tensor]) -> None:
    """Set this rank's generators to the states `_random_states` saved for it (a checkpoint written
    before states were kept per rank: rank 0's, for every rank)."""
    own = {key: value for key, value in generators.items() if not key.startswith(RANK_PREFIX)}
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank:
        prefix = _rank_prefix(rank)
        own = {key.removeprefix(prefix): value for key, value in generators.items() if key.startswith(prefix)} or own
    torch.set_rng_state(own["cpu"])
    cuda = [own[key] for key in sorted((key for key in own if key.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _rank_prefix(rank: int) -> str:
    return f"{RANK_PREFIX}{rank}." if rank else ""


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(full name, parameter) of every parameter that trains, in model order."""
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def adapter_buffers(delta_model: Any) -> list[tuple[str, torch.Tensor]]:
    """(full name, buffer) of the persistent buffers of every adapter: what training may change besides
    the parameters (VeLoRA's projection vector)."""
    held = {
        id(tensor)
        for _, site in delta_model.sites()
        for adapter in site.adapters.values()
        for tensor in adapter.state_dict(keep_vars=True).values()
        if not isinstance(tensor, torch.nn.Parameter)
    }
    return [(name, buffer) for name, buffer in delta_model.named_buffers() if id(buffer) in held]


def _load_buffers(delta_model: Any, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter buffers into the live ones of the same names."""
    live = dict(adapter_buffers(delta_model))
    with torch.no_grad():
        for name, tensor in saved.items():
            if name not in live:
                raise DeltaTuneError(
                    f"the checkpoint holds adapter buffer {name!r}, which this run lacks; resume with the config it "
                    "was written with"
                )
            live[name].copy_(tensor)


def _load_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved values into the live trainable parameters (in place: the optimizer keeps them; a
    sharded parameter takes its shard)."""
    live = dict(trainable_parameters(model))
    if set(live) != set(saved):
        missing = sorted(set(live) ^ set(saved))
        raise DeltaTuneError(
            f"the checkpoint does not fit this run (first differing parameter {missing[0]!r}); resume with the config "
            "it was written with"
        )
    with torch.no_grad():
        for name, parameter in live.items():
            sharding.copy_whole_into(parameter, saved[name])
