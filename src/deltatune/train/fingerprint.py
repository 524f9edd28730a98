"""Which run a checkpoint belongs to, so that `--resume` never continues another run.

Every checkpoint records its run: the full config, and a fingerprint of what decides the math of
training: every config setting except those in `KEEPS_THE_MATH` (nested ones by dotted name, such
as `adapter.r`; the adapter config with its defaults filled in), the number of processes (each step
reads `batch_size × gradient_accumulation_steps × world_size` examples), and a SHA-256 of the
encoded training examples (`training_data`: the examples themselves, wherever the file now lies),
and an identity of the base model's weights (`base_model_weights`, of what the run loads: the GGUF
file with `quantize: gguf`, which for a packaged model is not its converted folder): `model` names a
path, and other weights may be saved there later. The identity is the name, size and modification time of each
weights file in the model folder: a stat per file, where hashing the weights would read gigabytes on
every start. So rewriting the weights is always seen (even a change confined to a few layers, as a
merged LoRA makes, which hashing a sample of the bytes could miss), and copying the same weights
without keeping their times also counts as a change (resume from the original, or start afresh).
The model folder's `config.json` is recorded too (`base_model_config`, each entry by dotted name): its
architecture settings (norm eps, activation, rope, tied embeddings, dropout) change the math of every step
though the weights files are untouched; a GGUF file holds its settings itself. A checkpoint written before
this record existed resumes without it, with a warning: its model config is unknown, and refusing it would
leave every run checkpointed before the upgrade unresumable where nothing changed (its weights are compared).
A resume whose fingerprint differs stops and names what differs. A setting added to the config
later counts as changing the math unless it is listed here; a checkpoint written before it existed
counts as written with its `ADDED_LATER` value, which every earlier run computed with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import CheckpointMismatchError
from ..registry import method_for
from ..same_adapter import differences
from .checkpoint import read_trainer_state
from .config import TrainConfig
from .models import weights_source

KEEPS_THE_MATH = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "save_every",
        "save_total_limit",
        "eval_every",
        "log_every",
        "report_to",
        "max_eval_examples",
        "eval_file",
        "eval_batch_size",
        "max_new_tokens",
        "device",
        "threads",
        "release_freed_memory",
        "data_parallel",
        "gradient_checkpointing",
        "lean_gated_mlp",
        "loss_chunk_rows",
        "train_file",
    }
)
"""Settings a resumed run may change: where and how often it writes and evaluates, the device, its
thread count (the same math, up to float reduction order), the C heap policy (where memory comes from),
the data-parallel engine (DDP or FSDP: the same steps), activation recomputation (checkpointing, and the
lean gated MLP with bitwise the same gradients) and the lean loss's chunk (the same gradients up to float
rounding; a checkpoint written before the chunked loss existed resumes with it). `train_file` is compared
by content (`training_data`)."""

ADDED_LATER = {
    "packing": False,
    "group_by_length": False,
    "loraplus_lr_ratio": None,
    "loraplus_lr_embedding": 1e-6,
    "freeze_lora_a": False,
    "warmup_ratio": None,
    "adapter.lora_bias": False,
    "adapter.bias": "none",
    "adapter.trainable_token_indices": None,
    "adapter.eva_config": None,
    "adapter.corda_config": None,
    "adapter.use_bdlora": None,
    "adapter.kasa_config": None,
    "adapter.velora_config": None,
    "adapter.monteclora_config": None,
    "adapter.use_gating": False,
    "adapter.shared_gating": True,
    "adapter.embedding_dim": None,
    "adapter.shift_positions": True,
    "adapter.encoder_prefix": False,
    "adapter.cross_prefix": False,
    "adapter.prefix_tuning.encoder_prefix": True,
    "adapter.prefix_tuning.cross_prefix": True,
    "header": True,
    "column_names": None,
    "separator": None,
    "max_train_examples": None,
    "loss_added_by_trainer.monteclora_config": True,
    "loss_added_by_trainer.orth_reg_weight": True,
    "loss_added_by_trainer.kasa_config": False,
    "last_step_of_epoch": "tops up from the epoch's first examples",
}
"""Settings added after checkpoints began recording their run, with the value every earlier run had: a
checkpoint whose fingerprint lacks one was written with that value, so it resumes after an upgrade. An
adapter field counts only for the methods that have it (the run's own fingerprint holds it). The loss
terms the trainer adds (`loss_added_by_trainer.<term>`): MonteCLoRA's regulariser and AdaLoRA's
orthogonality term were always added; KaSA's was not (before it, a KaSA run trained on the task loss
alone), so an older KaSA checkpoint is refused. Where the step does not divide the example count, an
epoch's last step once topped up from the epoch's first examples (reading them twice) and is now short
(`last_step_of_epoch`), so such a checkpoint is refused. Prefix tuning's `encoder_prefix` and `cross_prefix`
came after: a prefix-tuning run had neither; a MAM or UniPELT run (`adapter.prefix_tuning.*`) could resume only
on models without an encoder, where True (their default now) computes the same."""

MODEL_CONFIG = "base_model_config"
"""The fingerprint's record of the model folder's config.json (`model_config_identity`)."""
MODEL_CONFIG_KEEPS_THE_MATH = frozenset({"_name_or_path", "transformers_version"})
"""Entries of a config.json that say where and by which transformers release it was saved, not the model."""

logger = logging.getLogger("deltatune")

DATA_FIELDS = ("train_file", "eval_file")
"""Settings that may hold records passed from Python instead of a path."""
WEIGHTS_SUFFIXES = (".safetensors", ".bin")
"""The files of a transformers model folder that hold its weights (also sharded ones)."""


def run_record(
    config: TrainConfig, train_features: list[dict[str, Any]], world_size: int, time_budget: float | None = None
) -> dict[str, Any]:
    """What a checkpoint stores about its run: {"fingerprint": ..., "config": every setting}; a run with a
    time budget records it (`time_budget.py`), and its checkpoints never resume."""
    settings = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    settings.update({name: _data_source(settings[name]) for name in DATA_FIELDS})
    compared = {name: value for name, value in settings.items() if name not in KEEPS_THE_MATH}
    compared["adapter"] = {"method": config.adapter["method"], **dataclasses.asdict(config.adapter_config())}
    examples = json.dumps(train_features, sort_keys=True, default=str).encode("utf-8")
    fingerprint = {
        **compared,
        "world_size": world_size,
        "training_data": hashlib.sha256(examples).hexdigest(),
        "base_model_weights": weights_identity(weights_source(config.model, config.quantize)),
        MODEL_CONFIG: model_config_identity(weights_source(config.model, config.quantize)),
        **_loss_added_by_trainer(config),
        **_last_step_of_epoch(config, len(train_features), world_size),
        **({"time_budget": time_budget} if time_budget is not None else {}),
    }
    return {"fingerprint": _dotted(_as_json(fingerprint)), "config": _as_json(settings)}


def _loss_added_by_trainer(config: TrainConfig) -> dict[str, Any]:
    """{"loss_added_by_trainer": {term: True}} for the terms the adapter's step hook adds to the task loss
    (the method's `trainer_loss_terms`), nothing without one: a run whose trainer adds another term trains
    on another loss."""
    adapter_config = config.adapter_config()
    terms = getattr(method_for(adapter_config), "trainer_loss_terms", None)
    added = terms(adapter_config) if terms is not None else []
    return {"loss_added_by_trainer": dict.fromkeys(added, True)} if added else {}


def _last_step_of_epoch(config: TrainConfig, count: int, world_size: int) -> dict[str, str]:
    """{"last_step_of_epoch": "short"} where a step's examples (`Schedule.per_step`) do not divide `count`:
    the last step of an epoch then reads only the examples left; nothing where every step is whole."""
    per_step = config.batch_size * config.gradient_accumulation_steps * world_size
    return {"last_step_of_epoch": "short"} if count % per_step else {}


def weights_identity(folder: Path) -> str:
    """A digest of (name, size, modification time) of every weights file in model `folder`."""
    if folder.is_file():  # a GGUF file is the model
        files = [folder]
    else:
        files = sorted(path for path in folder.iterdir() if path.name.endswith(WEIGHTS_SUFFIXES) and path.is_file())
    stats = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    return hashlib.sha256(json.dumps(stats).encode("utf-8")).hexdigest()


def model_config_identity(source: Path) -> dict[str, Any]:
    """The settings of model folder `source`'s config.json, less `MODEL_CONFIG_KEEPS_THE_MATH`; none for a
    GGUF file (its settings are in the file, which `weights_identity` covers). The file as written, not the
    config transformers loads from it, whose defaults differ between releases."""
    if source.is_file():
        return {}
    settings = json.loads((source / "config.json").read_text(encoding="utf-8"))
    return {name: value for name, value in settings.items() if name not in MODEL_CONFIG_KEEPS_THE_MATH}


def _records_model_config(fingerprint: dict[str, Any]) -> bool:
    """Whether a (dotted) fingerprint holds `MODEL_CONFIG`: `{}` for a GGUF file, its entries for a folder."""
    return any(name == MODEL_CONFIG or name.startswith(f"{MODEL_CONFIG}.") for name in fingerprint)


def check_same_run(folder: Path, record: dict[str, Any]) -> None:
    """Refuse to resume from checkpoint `folder` unless it was written by the run `record` describes."""
    saved = read_trainer_state(folder).get("run")
    again = "resume with the settings it was written with, or start afresh with overwrite_output_dir=true"
    if saved is None:
        raise CheckpointMismatchError(
            f"--resume: {folder} does not record which run wrote it (an older deltatune wrote it); {again}"
        )
    if saved["fingerprint"].get("time_budget") is not None:
        raise CheckpointMismatchError(
            f"--resume: {folder} was written by a run with a time budget, whose learning rate followed the clock, "
            "so no run can continue it exactly; train afresh without --resume"
        )
    now = record["fingerprint"]
    if not _records_model_config(saved["fingerprint"]):
        logger.warning(
            f"--resume: {folder} does not record the model's config.json (an older deltatune wrote it), so a "
            "change to the model's settings since then is not seen; the weights files are compared"
        )
        now = {name: value for name, value in now.items() if not _records_model_config({name: value})}
    before = {**{name: value for name, value in ADDED_LATER.items() if name in now}, **saved["fingerprint"]}
    differ = differences(before, now)
    if differ:
        raise CheckpointMismatchError(
            f"--resume: {folder} was written by a run with other settings ({', '.join(differ)}); {again}"
        )


def _data_source(value: Any) -> Any:
    """A data file's path as given; records passed from Python by their type only (what they hold
    is in `training_data`)."""
    return value if value is None or isinstance(value, (str, Path)) else f"({type(value).__name__} of records)"


def _dotted(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to dotted names (`adapter.r`), as overrides name them."""
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def _as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as they read back from JSON (tuples as lists; other objects by their text)."""
    return json.loads(json.dumps(settings, default=str))
