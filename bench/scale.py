"""Scale: LoRA training steps on a Llama of 7B-class shapes with an nf4 base, on this CPU machine.

    python bench/scale.py                      # 7B shapes, deltatune then peft, each in its own process
    python bench/scale.py --shape 13b --libraries deltatune
    python bench/scale.py --shape tiny         # the same code path on a tiny Llama, in seconds

The model is never held in float32. It is built on the meta device (no storage at all); transformers'
own `replace_with_bnb_linear` turns its linear layers into bitsandbytes `Linear4bit` (nf4, double
quantization, float32 compute: `deltatune.train.quantize.quantization_config("nf4")`), and each of them
then gets a random float32 weight (normal, std 0.02) that is quantized at once, as transformers does
per checkpoint tensor when it loads a model with that config, and freed before the next. Embeddings,
norms and the (untied) LM head get random float32 weights, as a quantized load keeps them. At 7B shapes
the float32 model would take 27 GB, more than this machine's 24.

Each library runs in a fresh process (`--worker`): LoRA r=16, α=32, dropout 0.05 on the seven linear
layer kinds, batch 1 × 64, `--steps` training steps (forward, loss, backward, AdamW; deltatune's
`causal_lm_loss` with the LM head only at labelled positions, peft's the model's own loss, as in
`workloads.lora_step`). Its peak memory is the resident-set high-water mark over building the model and
the steps, above the resident memory after imports (`workloads.memory_after_imports`): the definition of
`peak_with_load_bytes` in `make bench`. It writes bench/results-scale.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from measure import current_memory_bytes, peak_memory_bytes  # noqa: E402
from models import labels_for, token_batch  # noqa: E402
from workloads import lora_step, memory_after_imports  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4),
}
"""Llama shapes (vocabulary 32,000, as many key/value heads as heads, untied LM head)."""
BATCH, LENGTH, DROPOUT = 1, 64, 0.05
MEMORY_BOUND = 12 * 10**9


def nf4_llama(shape: dict[str, int], seed: int = 0) -> torch.nn.Module:
    """A Llama of `shape` with random weights and nf4 linear layers, quantized one weight at a time."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from deltatune.train.quantize import quantization_config

    config = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    quantization = quantization_config("nf4")
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quantization)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            if isinstance(parameter, bnb.nn.Params4bit):
                random = torch.randn(parameter.shape, generator=generator).mul_(0.02)
                quantized = bnb.nn.Params4bit(random, requires_grad=False, **parameter.__dict__).to("cpu")
                module._parameters[name] = quantized
                del random
            else:
                value = torch.ones(parameter.shape) if "norm" in type(module).__name__.lower() else None
                if value is None:
                    value = torch.randn(parameter.shape, generator=generator).mul_(0.02)
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=parameter.requires_grad)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    model.is_loaded_in_4bit = True  # as transformers marks a 4-bit load (peft dispatches on it)
    model.config.quantization_config = quantization
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    return model.train()


def logical_parameters(model: torch.nn.Module) -> int:
    """Parameters of the model as it would be in float32 (a 4-bit weight counts its logical shape)."""
    import bitsandbytes as bnb

    return sum(
        parameter.quant_state.shape.numel() if isinstance(parameter, bnb.nn.Params4bit) else parameter.numel()
        for parameter in model.parameters()
    )


def worker(library: str, shape_name: str, steps: int, threads: int) -> dict[str, Any]:
    """Build the model, run `steps` LoRA training steps, report memory and seconds (one JSON line)."""
    torch.set_num_threads(threads)
    before = memory_after_imports()
    start = time.perf_counter()
    model = nf4_llama(SHAPES[shape_name])
    build_seconds = time.perf_counter() - start
    model_bytes = current_memory_bytes() - before
    parameters = logical_parameters(model)
    input_ids = token_batch(model, BATCH, LENGTH)
    step = lora_step(library, model, DROPOUT, input_ids, labels_for(input_ids, None))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak = peak_memory_bytes() - before
    return {
        "library": library,
        "shape": shape_name,
        "parameters": parameters,
        "trainable_parameters": trainable,
        "build_seconds": build_seconds,
        "model_bytes": model_bytes,
        "peak_with_load_bytes": peak,
        "bytes_per_parameter": peak / parameters,
        "step_seconds_all": seconds,
        "step_seconds": statistics.median(seconds[1:] or seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--libraries", default="deltatune,peft")
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first is not in the median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results-scale.json"))
    arguments = parser.parse_args(argv)
    if arguments.worker:
        print(json.dumps(worker(arguments.worker, arguments.shape, arguments.steps, arguments.threads)))
        return 0
    results = {}
    for library in arguments.libraries.split(","):
        print(f"{arguments.shape}: {library} ...", flush=True)
        command = [sys.executable, __file__, "--worker", library, "--shape", arguments.shape]
        command += ["--steps", str(arguments.steps), "--threads", str(arguments.threads)]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"{library} failed:\n{finished.stderr[-3000:]}")
        results[library] = json.loads(finished.stdout.strip().splitlines()[-1])
        print_row(results[library])
    out = Path(arguments.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[arguments.shape] = {"machine": machine(arguments.threads), "results": results}
    out.write_text(json.dumps(saved, indent=2) + "\n")
    return 0


def machine(threads: int) -> dict[str, Any]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": platform.python_version(),
    }


def print_row(result: dict[str, Any]) -> None:
    peak = result["peak_with_load_bytes"]
    print(
        f"  {result['library']}: {result['parameters'] / 1e9:.2f} B parameters, built in "
        f"{result['build_seconds']:.0f} s, model {result['model_bytes'] / 1e9:.2f} GB, peak {peak / 1e9:.2f} GB "
        f"({'within' if peak <= MEMORY_BOUND else 'OVER'} 12 GB; {result['bytes_per_parameter']:.3f} bytes/parameter), "
        f"step {result['step_seconds']:.1f} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
