"""E2E records for the whole-run benchmark, and the one tokenization every system and the evaluator use.

`/work/shared/data/e2e/*.txt` (E2E NLG): one example a line, `meaning representation||reference text`,
the representation a variable number of `slot : value` fields joined by ` | `. A record is
{prompt: the representation and a newline, completion: the text}; the completion is the only part
learned. With SmolLM2's tokenizer the ids of prompt + completion + EOS tokenized together equal the
prompt's ids followed by the completion's, so deltatune (which tokenizes the two
apart), TRL (which tokenizes them together) and the bench's own encoding give the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path("/work/shared/data/e2e")
TRAIN_SOURCE = DATA / "valid.txt"
EVAL_SOURCE = DATA / "test.txt"
SEPARATOR = "||"
IGNORE_INDEX = -100


def e2e_records(path: Path, count: int) -> list[dict[str, str]]:
    """`count` examples of an E2E file, evenly spaced through it (the file lists the references of one
    representation together), as prompt/completion records in file order."""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: the whole-run benchmark needs the E2E data set there")
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line]
    if count > len(lines):
        raise SystemExit(f"{path} holds {len(lines)} examples, fewer than the {count} asked for")
    records = []
    for index in range(count):
        number, line = lines[index * len(lines) // count]
        meaning, sign, text = line.partition(SEPARATOR)
        if not sign:
            raise SystemExit(f"{path} line {number}: expected `meaning representation||text`")
        records.append({"prompt": meaning.strip() + "\n", "completion": text.strip()})
    return records


def long_records(records: list[dict[str, str]], tokenizer: Any, length: int) -> list[dict[str, str]]:
    """Records of about `length` tokens each (the memory measure at max_length 1024): consecutive E2E
    records joined, their representations as the prompt and their texts as the completion, up to the
    last that keeps the whole under `length` tokens."""
    joined, prompts, completions, size = [], [], [], 0
    for record in records:
        cost = len(encode(tokenizer, record, 10**9)["input_ids"])
        if prompts and size + cost > length:
            joined.append({"prompt": "".join(prompts), "completion": " ".join(completions)})
            prompts, completions, size = [], [], 0
        prompts.append(record["prompt"])
        completions.append(record["completion"])
        size += cost
    return joined


def encode(tokenizer: Any, record: dict[str, str], max_length: int) -> dict[str, list[int]]:
    """input_ids (prompt, completion, EOS; cut at max_length) and labels (-100 on the prompt)."""
    prompt = tokenizer(record["prompt"])["input_ids"]
    completion = tokenizer(record["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prompt + completion)[:max_length]
    labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: len(ids)]}


def token_counts(tokenizer: Any, records: list[dict[str, str]], max_length: int) -> dict[str, int]:
    """Real (non-pad) tokens and labelled tokens of the records as every system trains them."""
    encoded = [encode(tokenizer, record, max_length) for record in records]
    return {
        "tokens": sum(len(item["input_ids"]) for item in encoded),
        "labelled_tokens": sum(sum(label != IGNORE_INDEX for label in item["labels"]) for item in encoded),
        "longest": max(len(item["input_ids"]) for item in encoded),
    }


def split_tokenization_mismatches(tokenizer: Any, records: list[dict[str, str]]) -> int:
    """Records whose prompt + completion + EOS tokenized as one text differ from `encode`'s ids."""
    return sum(
        tokenizer(record["prompt"] + record["completion"] + tokenizer.eos_token)["input_ids"]
        != encode(tokenizer, record, 10**9)["input_ids"]
        for record in records
    )


def write_jsonl(records: list[dict[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
