"""The one line a run prints as training starts, so a newcomer sees at once what is about to happen:

    training: model ./bert-tiny, task seq-cls, 2 labels (negative, positive), method lora,
    18,432 trainable parameters of 4,402,690 (0.4186%), 60 steps, device cpu

(one line; wrapped here). A resumed run names the step it continues from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import Run

SHOWN_LABELS = 8
"""Label names shown; more are counted."""


def start_line(run: Run, total_steps: int, first_step: int) -> str:
    """What the run trains (model, task, labels, method), how much (trainable parameters, steps) and where."""
    parameters = run.delta_model.trainable_summary()
    parts = [f"model {run.config.model}", f"task {run.task.name}"]
    if run.task.label_field is not None:
        parts.append(_labels(list(run.delta_model.base_model.config.id2label.values())))
    steps = f"{total_steps} steps" if first_step == 0 else f"steps {first_step + 1} to {total_steps} (resumed)"
    parts += [
        f"method {run.config.adapter['method']}",
        f"{parameters.trainable:,} trainable parameters of {parameters.total:,} ({parameters.trainable_percent:.4f}%)",
        steps,
        f"device {run.device}",
    ]
    return "training: " + ", ".join(parts)


def _labels(names: list[str]) -> str:
    return f"{len(names)} label{'s' if len(names) != 1 else ''} ({shown_labels(names)})"


def shown_labels(names: list[str]) -> str:
    """The first `SHOWN_LABELS` label names, comma-separated, `...` for the rest."""
    return ", ".join(map(str, names[:SHOWN_LABELS])) + (", ..." if len(names) > SHOWN_LABELS else "")
