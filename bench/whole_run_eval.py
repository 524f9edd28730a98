"""The whole-run benchmark's one evaluator: `python whole_run_eval.py SPEC.json EVAL.jsonl ADAPTERS.json
RESULT.json`, ADAPTERS.json {system: adapter folder}. Every adapter is put on a fresh copy of the same
base by peft (`PeftModel.from_pretrained`): a deltatune folder is first written in peft's format by
deltatune (`DeltaModel.save(format="peft")`). The loss is the mean over all completion tokens of the
held-out records (EOS included) of -log p(token | what precedes it), in float32, adapters in eval mode:

    loss = Σ_examples Σ_{t labelled} −log softmax(logits_{t−1})[x_t]  /  (number of labelled tokens)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from whole_run_data import IGNORE_INDEX, encode, read_jsonl  # noqa: E402
from whole_run_spec import RunSpec  # noqa: E402

BATCH = 8


def _base(spec: RunSpec) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.model, local_files_only=True, dtype=torch.float32)


def _peft_folder(spec: RunSpec, folder: Path, scratch: Path) -> Path:
    """`folder` if peft can read it, else a peft-format copy written by deltatune."""
    import deltatune
    from deltatune.io import folder_kind

    if folder_kind(folder) == "peft":
        return folder

    converted = scratch / folder.parent.name
    deltatune.load(_base(spec), str(folder)).save(str(converted), format="peft")
    return converted


def mean_completion_loss(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Mean next-token cross-entropy over the labelled positions of every batch, and their count."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(losses)
            count += int((targets != IGNORE_INDEX).sum())
    return total / count, count


def eval_batches(tokenizer: Any, records: list[dict[str, str]], max_length: int) -> list[dict[str, torch.Tensor]]:
    """The held-out records encoded as for training, sorted by length and padded on the right per batch."""
    encoded = sorted(
        (encode(tokenizer, record, max_length) for record in records), key=lambda item: len(item["input_ids"])
    )
    batches = []
    for start in range(0, len(encoded), BATCH):
        chunk = encoded[start : start + BATCH]
        width = max(len(item["input_ids"]) for item in chunk)

        def padded(key: str, value: int) -> torch.Tensor:
            return torch.tensor([item[key] + [value] * (width - len(item[key])) for item in chunk])

        batches.append(
            {
                "input_ids": padded("input_ids", tokenizer.pad_token_id),
                "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", IGNORE_INDEX),
            }
        )
    return batches


def main(argv: list[str]) -> int:
    from peft import PeftModel
    from transformers import AutoTokenizer

    spec_path, eval_path, adapters_path, result_path = argv
    spec = RunSpec.read(spec_path)
    torch.set_num_threads(spec.threads)
    tokenizer = AutoTokenizer.from_pretrained(spec.model, local_files_only=True)
    batches = eval_batches(tokenizer, read_jsonl(eval_path), spec.max_length)
    results: dict[str, Any] = {}
    base_loss, tokens = mean_completion_loss(_base(spec).eval(), batches)
    results["base"] = {"eval_loss": base_loss, "eval_tokens": tokens}
    with tempfile.TemporaryDirectory() as scratch:
        for system, folder in json.loads(Path(adapters_path).read_text()).items():
            readable = _peft_folder(spec, Path(folder), Path(scratch))
            model = PeftModel.from_pretrained(_base(spec), str(readable)).eval()
            loss, tokens = mean_completion_loss(model, batches)
            results[system] = {"eval_loss": loss, "eval_tokens": tokens}
    Path(result_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
