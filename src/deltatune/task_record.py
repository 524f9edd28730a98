"""What an adapter folder records of the task its model was built for, so that the head can be rebuilt.

A classification or QA model gets a new head (`classifier`, `score`, `qa_outputs`) that trains fully, as
one of the adapter's `modules_to_save`. Its saved weights fit only a head of their shape, and the label
ids they predict mean only what the training run's label names said. So a folder records:

    {"task": "seq-cls", "id2label": {"0": "negative", "1": "positive"},
     "heads": {"classifier": {"weight": [2, 32], "bias": [2]}}}

`task` is the trainer's task name of the model's transformers class (`...ForSequenceClassification` →
`seq-cls`); `id2label` is the model config's, for the labelled tasks (seq-cls, token-cls); `heads` are
the adapter's `modules_to_save` that are children of the model, and under a method that trains the base
in place (`trains_base`: full fine-tuning) the model's task heads (`task_heads`), with their parameter
shapes. A model that is not a transformers task model records nothing.

`fit_heads` rebuilds a head whose shape differs (a model loaded with another `num_labels`): each
`nn.Linear` inside it whose weight shape differs becomes a fresh one of the recorded shape; and the
config's labels become the recorded ones wherever they differ (a head of the same shape too: a saved
head's label ids mean the names it was trained with), so the saved head weights load and the model and
a merged one predict with the adapter's label names. `deltatune merge` and `deltatune eval` load the
model with the task's class and the recorded labels (`recorded_task`), which is how a seq-cls adapter
trained from a plain encoder folder (no classifier in it) merges into a model that
`AutoModelForSequenceClassification` loads.

A record read from a folder is checked first (`task_problem`): `task` a string, `id2label` the ids 0..N-1
(as text) to strings, `heads` child module names (no '.') to {parameter name: shape}; one of another form
is refused where the folder is read (`folder_records`), before any head is touched. Then against the folder's
weights file and the model (`file_problem`): each head one of the model's heads, with its parameters in the
file in the recorded shapes, and as many distinct label names as the head has rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from torch import nn

from .errors import AdapterShapeError
from .field_check import FullMatch, NonNegativeInt, mapping_problem
from .registry import method_for
from .site import site_of
from .targeting import model_modules

if TYPE_CHECKING:
    from .model import DeltaModel

TASK_KEY = "task"
TASK_OF_CLASS = {
    "ForSequenceClassification": "seq-cls",
    "ForTokenClassification": "token-cls",
    "ForQuestionAnswering": "qa",
    "ForCausalLM": "causal-lm",
    "ForConditionalGeneration": "seq2seq-lm",
    "ForSeq2SeqLM": "seq2seq-lm",
}
"""transformers class name suffix → the trainer's task name."""
LABELLED_TASKS = ("seq-cls", "token-cls")
AUTO_CLASSES = {
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "qa": "AutoModelForQuestionAnswering",
}
"""Task → the transformers auto class that builds its head (named in errors)."""
RECORD_FIELDS = {
    "task": str,
    "id2label": dict[Annotated[str, FullMatch(r"0|[1-9][0-9]*", "label ids written as whole numbers")], str],
    "heads": dict[Annotated[str, FullMatch(r"[^.]+", "child module names (no '.')")], dict[str, list[NonNegativeInt]]],
}
"""The form of each key of a read task record (`task_problem`)."""


def head_children(model: nn.Module) -> list[str]:
    """The children of `model` with parameters other than its backbone (`base_model_prefix`): a task
    model's heads (`classifier`, `score`, `qa_outputs`)."""
    backbone = getattr(model, "base_model_prefix", "")
    return [
        name for name, child in model.named_children() if name != backbone and any(True for _ in child.parameters())
    ]


def task_heads(model: nn.Module) -> list[str]:
    """The heads a classification or QA model adds on its backbone (`head_children`): new, so random in each
    model loaded from a plain encoder; none for other models (a language model's head is pretrained)."""
    return head_children(model) if task_of(model) in AUTO_CLASSES else []


def task_of(model: nn.Module) -> str | None:
    """The trainer's task name of `model`'s transformers class, None for other models."""
    class_name = type(model).__name__
    return next((task for suffix, task in TASK_OF_CLASS.items() if class_name.endswith(suffix)), None)


def task_record(delta_model: DeltaModel, name: str) -> dict[str, Any] | None:
    """What adapter `name`'s folder records of its task (see the module docstring), or None."""
    model = delta_model.base_model
    task = task_of(model)
    if task is None:
        return None
    record: dict[str, Any] = {"task": task}
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if task in LABELLED_TASKS and id2label:
        record["id2label"] = {str(index): str(label) for index, label in sorted(id2label.items())}
    targets = set(delta_model.targets[name])
    placed = delta_model.records[name].placed
    children = head_children(model)  # not the backbone, which a method may watch (ReFT's position tap)
    heads = [module_name for module_name in placed if module_name not in targets and module_name in children]
    if getattr(method_for(delta_model.configs[name]), "trains_base", False):  # its heads train in place
        heads += [head for head in task_heads(model) if head not in heads and _holds_any(head, placed)]
    if heads:
        record["heads"] = {head: _shapes(model.get_submodule(head)) for head in heads}
    return record


def _holds_any(head: str, module_names: list[str]) -> bool:
    return any(module_name == head or module_name.startswith(f"{head}.") for module_name in module_names)


def task_problem(record: Any) -> str | None:
    """What is wrong with a task record read from a folder, None when nothing is: its keys of the form
    `RECORD_FIELDS` gives, and label ids 0..N-1 (a head's rows)."""
    problem = mapping_problem(record, RECORD_FIELDS, required=("task",))
    if problem is not None:
        return problem
    ids = sorted(int(key) for key in record.get("id2label", {}))
    return None if ids == list(range(len(ids))) else f"its id2label ids must be 0 to N-1, got {ids}"


def file_problem(record: dict[str, Any], model: nn.Module, shapes: Mapping[str, list[int]], prefix: str) -> str | None:
    """What in the task `record` of a folder contradicts its weights file (tensor key → shape: `shapes`, a head's
    parameter under `<prefix><head>.<parameter>`) or `model`, None when nothing does: a head that is not one of
    the model's heads (`head_children`: a rebuilt layer inside the backbone would stay random), a head parameter
    `fit_heads` would rebuild (its shape differs from the model's) that the file lacks or holds in another shape
    (nothing would fill the rebuilt layer), a label name given twice, or label names of another count than a
    head's output rows (the rows of its last 2-D weight). Checked before anything is built, so a recorded shape is
    never allocated before it is compared with the file's."""
    heads = record.get("heads") or {}
    children, present = head_children(model), dict(model.named_children())
    for head, parameters in heads.items():
        if head not in present:  # `fit_heads` names the class to load
            continue
        if head not in children:
            return f"head {head!r}, which is not one of this model's heads ({children})"
        current = _current_parameters(present[head])
        for parameter, shape in parameters.items():
            if parameter in current and list(current[parameter].shape) == shape:
                continue  # kept as it is: a head the adapter does not store (a position tap's module) is fine
            key = f"{prefix}{head}.{parameter}"
            if key not in shapes:
                return f"head parameter {key!r} of shape {shape}, for which the weights file holds no tensor"
            if list(shapes[key]) != shape:
                return f"head parameter {key!r} of shape {shape}, while the weights file holds {list(shapes[key])}"
    labels = label_names(record)
    repeated = [label for label, count in Counter(labels).items() if count > 1]
    if repeated:
        return f"id2label names {repeated[0]!r} twice"
    for head, parameters in heads.items():
        rows = [shape[0] for shape in parameters.values() if len(shape) == 2]
        if labels and rows and rows[-1] != len(labels):
            return (
                f"id2label holds {len(labels)} name{'s' if len(labels) > 1 else ''}, while head {head!r} has "
                f"{rows[-1]} rows"
            )
    return None


def label_names(record: dict[str, Any] | None) -> list[str]:
    """The recorded label names in id order; none where the record has none."""
    id2label = (record or {}).get("id2label") or {}
    return [id2label[key] for key in sorted(id2label, key=int)]


def fit_heads(model: nn.Module, record: dict[str, Any] | None, source: object) -> Callable[[], None]:
    """Rebuild the heads of `model` whose shapes differ from `record`'s and take its label names where they
    differ from the config's (even for heads of the same shape); returns the undo (the old heads and labels
    back). A head the model lacks is an error naming the class to load."""
    if not record or not record.get("heads"):
        return lambda: None
    changes: list[Callable[[], None]] = []
    try:
        for head, shapes in record["heads"].items():
            changes += _fit_head(model, head, shapes, record, source)
        changes.append(_set_labels(model, label_names(record)))  # the ids the saved head predicts mean these names
    except BaseException:
        _undo(changes)
        raise
    return lambda: _undo(changes)


def _fit_head(
    model: nn.Module, head: str, shapes: dict[str, list[int]], record: dict[str, Any], source: object
) -> list[Callable[[], None]]:
    try:
        module = model.get_submodule(head)
    except AttributeError:
        task = record.get("task")
        raise AdapterShapeError(
            f"{source} was trained for {task} with a head {head!r}, which this {type(model).__name__} lacks; load "
            f"the base with {AUTO_CLASSES.get(task, 'the task class')} (deltatune merge and eval do)"
        ) from None
    changes = []
    for parameter_name, shape in shapes.items():
        current = _current_parameters(module).get(parameter_name)
        if current is not None and list(current.shape) == shape:
            continue
        if any(site_of(child) is not None for child in module.modules()):
            raise AdapterShapeError(
                f"{source} holds a head {head!r} of another shape than this model's, which holds another adapter's "
                "part there, so it cannot be rebuilt; load this adapter onto a model of its own"
            )
        owner_name = parameter_name.rpartition(".")[0]
        owner = module.get_submodule(owner_name) if owner_name else module
        if not isinstance(owner, nn.Linear) or len(shapes.get(_weight_of(owner_name), [])) != 2:
            raise AdapterShapeError(
                f"{source} holds a head {head!r} whose {parameter_name} has shape {tuple(shape)}, this model's is "
                f"{tuple(current.shape) if current is not None else 'absent'}; load the base with that head's shape "
                "(num_labels)"
            )
        changes.append(_replace_linear(model, f"{head}.{owner_name}" if owner_name else head, shapes, owner_name))
    return changes


def _current_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """`module`'s own parameters and its children's, by name, deltatune's adapters left out."""
    return {
        f"{prefix}.{name}" if prefix else name: parameter
        for prefix, child in model_modules(module)
        for name, parameter in child.named_parameters(recurse=False)
    }


def _weight_of(owner_name: str) -> str:
    return f"{owner_name}.weight" if owner_name else "weight"


def _replace_linear(model: nn.Module, full_name: str, shapes: dict[str, list[int]], owner_name: str) -> Callable:
    """Put a fresh `nn.Linear` of the recorded shape at `full_name` (in the old one's dtype and device)."""
    old = model.get_submodule(full_name)
    out_features, in_features = shapes[_weight_of(owner_name)]
    has_bias = f"{owner_name}.bias" in shapes if owner_name else "bias" in shapes
    new = nn.Linear(in_features, out_features, bias=has_bias, device=old.weight.device, dtype=old.weight.dtype)
    new.requires_grad_(old.weight.requires_grad)
    parent_name, _, leaf = full_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.register_module(leaf, new)
    return lambda: parent.register_module(leaf, old)


def _set_labels(model: nn.Module, labels: list[str]) -> Callable[[], None]:
    """Give the model config the recorded label names where they differ from its own; returns the undo."""
    config = getattr(model, "config", None)
    id2label = dict(enumerate(labels))
    if config is None or not labels or getattr(config, "id2label", None) == id2label:
        return lambda: None
    before = (config.id2label, config.label2id)
    config.id2label = id2label
    config.label2id = {label: index for index, label in enumerate(labels)}

    def undo() -> None:
        config.id2label, config.label2id = before

    return undo


def _undo(changes: list[Callable[[], None]]) -> None:
    for undo in reversed(changes):
        undo()


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    return {name: list(parameter.shape) for name, parameter in _current_parameters(module).items()}
