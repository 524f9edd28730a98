"""The training loop behind `deltatune train` and `deltatune.train.train(config)`.

One optimizer step takes `batch_size × gradient_accumulation_steps × world_size` examples (an epoch's
last step those left, so each is read once an epoch), in an order that is a pure function of (seed,
step) (`schedule.py`): that, plus the optimizer, scheduler and random states in a checkpoint, is what
makes `--resume` continue bit-exactly. AdamW updates the trainable parameters only (the adapter, and
any `modules_to_save`); the learning rate warms up linearly for
`warmup_steps`, then follows the schedule (linear or cosine to zero, or constant).

Nothing goes wrong silently. The output folder is locked for the run (`output_lock.py`: a second run
into it refuses) and checked before the model loads (`outputs.py`);
`--resume` continues only the run that wrote the checkpoint (`fingerprint.py`). Every step checks
that its loss and total gradient norm are finite (one device sync: the norm is what gradient
clipping computes anyway), and every save that its weights and the optimizer's state are: a run that
diverges stops with a `TrainingDivergedError` naming the step and the likely cause, saves no adapter
and keeps the checkpoints written before.
The end of a run (the adapter saved before its final evaluation, then the report) is `run_end.py`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DeltaTuneError
from ..gated_mlp import lean_gated_mlp
from ..losses import loss_chunk_rows
from ..model import DeltaModel
from ..qlora import prepare_quantized_base
from ..single_adapter import single_adapter_folder
from . import distributed
from .allocator import release_freed_memory, return_free_heap_pages
from .checkpoint import (
    CHECKPOINTS_FOLDER,
    TrainerState,
    checkpoint_folder,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_step_state,
    save_checkpoint,
    trainable_parameters,
)
from .config import TrainConfig
from .data import read_records, subsample
from .data_init import start_from_data, start_from_weights
from .divergence import check_step, check_weights
from .encode import EncodeContext, collate, label_names
from .evaluate import Evaluation, evaluate
from .fingerprint import check_same_run, run_record
from .models import adapter_task, attach_adapter, load_model, load_tokenizer, model_folder
from .optimizer import build_optimizer, freeze_lora_a
from .output_lock import output_lock
from .outputs import check_output_dir, clear_previous_run
from .packing import packed_collate_for
from .predict import EvalContext
from .progress import TrainingBar, TrainingClock
from .quantize import require_backend
from .report import write_report
from .run_end import RunEnd, TrainResult, evaluate_into, finish
from .schedule import Schedule, learning_rate_factor
from .start_line import start_line
from .step_hooks import StepHook, after_step, extra_loss, hooks_state, load_hooks_state, step_hooks
from .tasks import TaskType, get_task
from .threads import use_threads
from .time_budget import StopRule, refuse_step_schedules
from .tracking import Trackers, reporting, require_trackers, tracker_names


@dataclass
class Run:
    """A model with its adapter, tokenizer and encoded data, ready to train or evaluate."""

    config: TrainConfig
    task: TaskType
    tokenizer: Any
    delta_model: DeltaModel
    train_features: list[dict[str, Any]]
    eval_features: list[dict[str, Any]]
    device: torch.device
    eval_context: EvalContext = field(init=False)
    evaluate_again: str | None = field(default=None, kw_only=True)
    """The command that evaluates the saved adapter again, for the entry point that trains (a failed final
    evaluation advises it); None: the Python call on the run's config."""

    def __post_init__(self) -> None:
        self.eval_context = EvalContext(
            self.tokenizer, self.device, self.config.eval_batch_size, self.config.max_new_tokens
        )

    def evaluate(self, with_loss: bool = True, progress: bool = True) -> Evaluation:
        if not self.eval_features:
            raise DeltaTuneError("there is no eval_file in the config; set eval_file=PATH to evaluate")
        return evaluate(self.delta_model, self.task, self.eval_features, self.eval_context, with_loss, progress)

    def write_report(
        self,
        output_dir: Path,
        history: list[dict[str, float]],
        final: Evaluation | None,
        seconds: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """`metrics.json` and the plot of this run (`report.py`)."""
        write_report(
            output_dir,
            task=self.task.name,
            method=self.config.adapter.get("method"),
            parameters=self.delta_model.trainable_summary(),
            history=history,
            final_metrics=final.metrics if final else {},
            seconds=seconds,
            main_metric=self.task.main_metric,
            extra=extra,
        )


def choose_device(name: str, ranks: distributed.Ranks) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device(f"cuda:{ranks.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def prepare_run(
    config: TrainConfig, device: torch.device | None = None, adapter: str | None = None, quiet: bool = False
) -> Run:
    """Read and encode the data, load the model and attach the adapter from the config (or load the
    saved adapter folder `adapter`). Data and config errors, and a missing `quantize` backend, come
    before the data is read and the model loaded. A base loaded with `quantize` is loaded onto the
    device; a quantized base (from `quantize` or a checkpoint saved quantized) is prepared
    (`deltatune.prepare_quantized_base`); the move to the device after it is
    `nn.Module.to` of the DeltaModel, never transformers' `to` (which refuses dtype casts of
    bitsandbytes models), and a no-op for a base already there. Under FSDP the model stays on the CPU:
    sharding moves each rank's shards to the device, a block at a time. A new task head is said in one line
    (`load_report`) by the main process, unless `quiet`."""
    task = get_task(config.task)
    if config.quantize is not None:
        require_backend(config.quantize)
    if adapter is not None:
        single_adapter_folder(adapter)  # loaded, a folder of several would run its first adapter only
    ranks = distributed.ranks_from_environment()
    device = device or choose_device(config.device, ranks)
    home = torch.device("cpu") if distributed.sharded(ranks, config.data_parallel) else device
    use_threads(config.threads)
    if config.release_freed_memory:
        release_freed_memory()
    adapter_config = config.adapter_config() if adapter is None else None
    layout = config.table_layout()
    train_records = subsample(
        read_records(config.train_file, config.columns, layout), config.max_train_examples, config.seed
    )
    eval_records = read_records(config.eval_file, config.columns, layout) if config.eval_file else []
    eval_records = subsample(eval_records, config.max_eval_examples, config.seed)
    tokenizer = load_tokenizer(config.tokenizer or str(model_folder(config.model)))
    labels = label_names(task.label_field, train_records)
    if adapter is not None:  # the label ids of the adapter's head, as its folder records them
        labels = adapter_task(adapter)[1] or labels
    context = EncodeContext(
        tokenizer, config.max_length, config.chat_template, config.system_prompt, {n: i for i, n in enumerate(labels)}
    )
    train_features, eval_features = task.encode(train_records, context), task.encode(eval_records, context)
    torch.manual_seed(config.seed)
    quiet = quiet or not ranks.main
    model = load_model(config.model, task, tokenizer, labels, config.quantize, str(home), quiet=quiet, adapter=adapter)
    prepare_quantized_base(model, config.gradient_checkpointing)  # nothing on a base without quantized layers
    return_free_heap_pages()  # what the load freed inside the heaps (`allocator`): one call, on any setting
    if adapter is None:
        delta_model = attach_adapter(model, adapter_config, task)
        start_from_data(delta_model, train_features, config.batch_size, getattr(tokenizer, "pad_token_id", None) or 0)
        start_from_weights(delta_model, config)
    else:
        from .. import load

        delta_model = load(model, adapter)
    return Run(config, task, tokenizer, delta_model.to(home), train_features, eval_features, device)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    wanted = config.bf16
    if wanted == "auto":
        wanted = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16) if wanted else contextlib.nullcontext()


def train(
    config: TrainConfig,
    resume: str | Path | bool | None = None,
    progress: bool = True,
    time_budget: float | None = None,
    evaluate_again: str | None = None,
) -> TrainResult:
    """Train the adapter the config describes; returns the trained model and what was measured.
    `resume=True` continues from the latest checkpoint in `output_dir`, a path from that checkpoint.
    `time_budget`: train for this many seconds instead of the config's steps (`time_budget.py`).
    `evaluate_again`: the caller's command that evaluates the saved adapter (`Run.evaluate_again`)."""
    ranks = distributed.ranks_from_environment()
    with output_lock(Path(config.output_dir), ranks.main):  # the trainer's own is then taken already
        check_output_dir(config, resume)
        require_trackers(tracker_names(config.report_to))
        device = choose_device(config.device, ranks)
        joined = distributed.start(ranks, device)
        try:
            run = prepare_run(config, device, quiet=not progress)
            run.evaluate_again = evaluate_again
            return train_run(run, resume, progress, time_budget)
        finally:
            if joined:
                distributed.stop(ranks)


def train_run(
    run: Run, resume: str | Path | bool | None = None, progress: bool = True, time_budget: float | None = None
) -> TrainResult:
    """Train a prepared run (see `train`); under a launcher the process group must be joined. The main
    process reports to the trackers of `report_to` (`deltatune.train.tracking`), closed as failed if training
    fails. The main process holds the output folder's lock (`output_lock`) throughout."""
    output_dir = Path(run.config.output_dir)
    with (
        output_lock(output_dir, distributed.ranks_from_environment().main),
        reporting(run.config.report_to, output_dir) as trackers,
        lean_gated_mlp(run.delta_model, run.config.lean_gated_mlp),
    ):
        return _train_run(run, resume, progress, time_budget, trackers)


def _train_run(
    run: Run, resume: str | Path | bool | None, progress: bool, time_budget: float | None, trackers: Trackers
) -> TrainResult:
    ranks = distributed.ranks_from_environment()
    config, output_dir = run.config, Path(run.config.output_dir)
    check_output_dir(config, resume)
    if time_budget is not None and (resume or ranks.distributed):
        raise DeltaTuneError("a time budget runs in one process and from the start: leave out --resume and torchrun")
    if time_budget is not None:
        refuse_step_schedules(config.adapter["method"])
    if not run.train_features:
        raise DeltaTuneError(f"{config.train_file} holds no training examples")
    if config.gradient_checkpointing:
        run.delta_model.gradient_checkpointing_enable()
    schedule = Schedule(config, [len(feature["input_ids"]) for feature in run.train_features], ranks)
    freeze_lora_a(run.delta_model, config)
    model = distributed.wrap(run.delta_model, ranks, run.device, config.data_parallel)  # FSDP replaces the parameters
    parameters = [parameter for _, parameter in trainable_parameters(run.delta_model)]
    optimizer = build_optimizer(run.delta_model, config)
    clock = TrainingClock()
    stop = StopRule(schedule.total, time_budget, clock)
    factor = learning_rate_factor(config, schedule.total, stop.share_spent if time_budget is not None else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    hooks = _step_hooks(run, ranks, schedule.total)
    state = _starting_state(run, ranks, resume, optimizer, scheduler, hooks, time_budget)
    trackers.start(state.run["config"], enabled=ranks.main)
    if progress and ranks.main:
        print(start_line(run, schedule.total, state.step), flush=True)
    pad_id = run.eval_context.pad_id
    build_batch = (
        packed_collate_for(run.delta_model, config.max_length, pad_id, run.device)
        if config.packing
        else functools.partial(collate, pad_id=pad_id)
    )
    bar = TrainingBar(stop.known_steps, state.step, enabled=progress and ranks.main, clock=clock)
    started, tokens = time.perf_counter(), 0
    model.train()
    while not stop.finished(state.step):
        micro_steps = schedule.micro_steps(state.step)
        step_loss = torch.zeros((), device=run.device)
        for index, micro in enumerate(micro_steps):
            batch = {k: v.to(run.device) for k, v in build_batch([run.train_features[i] for i in micro.rows]).items()}
            tokens += sum(len(run.train_features[i]["input_ids"]) for i in micro.rows) if micro.counted else 0
            last = index == len(micro_steps) - 1
            with distributed.accumulate(model, ranks, config.data_parallel, last):
                with _autocast(config, run.device), loss_chunk_rows(config.loss_chunk_rows):
                    task_loss = run.task.loss(model, batch)
                loss = (task_loss + extra_loss(hooks)) / micro.divisor  # the step's mean over its examples
                loss.backward()
            step_loss += loss.detach()
        if ranks.distributed:
            torch.distributed.all_reduce(step_loss)
            step_loss /= ranks.world_size
        gradient_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm or math.inf)
        check_step(config, state.step + 1, float(step_loss), float(gradient_norm))
        optimizer.step()
        scheduler.step()
        after_step(hooks, state.step)
        optimizer.zero_grad(set_to_none=True)
        if config.release_freed_memory:
            return_free_heap_pages()  # the step's small freed blocks, inside the heap (`allocator`)
        state.step += 1
        last = stop.finished(state.step)
        bar.step(float(step_loss), tokens * ranks.world_size)
        with bar.paused():
            row = {"step": state.step, "loss": float(step_loss), "learning_rate": scheduler.get_last_lr()[0]}
            throughput = bar.tokens_per_second(tokens * ranks.world_size)
            _record(run, ranks, state, last, row, throughput, trackers, progress)
            if config.save_every and state.step % config.save_every == 0 and not last:
                check_weights(config, parameters, optimizer, state.step)
                folder = checkpoint_folder(output_dir, state.step)
                save_checkpoint(folder, run.delta_model, optimizer, scheduler, state, ranks.main, hooks_state(hooks))
                if ranks.main and config.save_total_limit:
                    prune_checkpoints(output_dir, config.save_total_limit)
                distributed.barrier(ranks)
    bar.close()
    return finish(RunEnd(run, ranks, state, parameters, optimizer, trackers, progress, started, clock.seconds()))


def _starting_state(
    run: Run,
    ranks: distributed.Ranks,
    resume: str | Path | bool | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hooks: dict[str, StepHook],
    time_budget: float | None,
) -> TrainerState:
    """Step 0 in an output folder cleared of earlier runs, or the checkpoint resumed (which must be
    this run's); either way the state records this run, for the checkpoints it writes."""
    output_dir = Path(run.config.output_dir)
    record = run_record(run.config, run.train_features, ranks.world_size, time_budget)
    if not resume:
        if ranks.main:
            clear_previous_run(output_dir)
        return TrainerState(run=record)
    folder = latest_checkpoint(output_dir) if resume is True else Path(resume)
    if folder is None:
        raise DeltaTuneError(
            f"--resume: no checkpoint in {output_dir / CHECKPOINTS_FOLDER}; train without --resume, or set save_every"
        )
    check_same_run(folder, record)
    state = load_checkpoint(folder, run.delta_model, optimizer, scheduler)
    load_hooks_state(hooks, read_step_state(folder))
    state.run = record
    return state


def _step_hooks(run: Run, ranks: distributed.Ranks, total_steps: int) -> dict[str, StepHook]:
    """The methods' step hooks (`step_hooks.py`: AdaLoRA's rank budget), which read whole parameters and
    gradients: not under FSDP, whose ranks hold shards."""
    hooks = step_hooks(run.delta_model, total_steps)
    if hooks and distributed.sharded(ranks, run.config.data_parallel):
        raise DeltaTuneError(
            f"adapter {next(iter(hooks))!r} needs whole parameters and gradients outside the forward pass (AdaLoRA's "
            "rank budget, MonteCLoRA's regulariser), which FSDP shards; train it with data_parallel: ddp"
        )
    return hooks


def _record(
    run: Run,
    ranks: distributed.Ranks,
    state: TrainerState,
    last: bool,
    row: dict[str, float],
    tokens_per_second: float,
    trackers: Trackers,
    progress: bool,
) -> None:
    """After step `row["step"]`: its row (loss, learning rate) into the history and, with the throughput,
    to the trackers, every `log_every` steps and at the last; an evaluation every `eval_every` steps."""
    config = run.config
    if state.step % config.log_every == 0 or last:
        state.history.append(row)
        trackers.log({**row, "tokens_per_second": tokens_per_second})
    if run.eval_features and config.eval_every and state.step % config.eval_every == 0 and not last:
        evaluate_into(run, ranks, state, progress, trackers)
