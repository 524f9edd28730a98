"""CUDA / bfloat16 checks and timings against peft, for a machine with a GPU:

    python bench/gpu_check.py [--out gpu.json]

SmolLM2-135M's shapes with seeded random weights in bfloat16 (timings and agreement depend on shapes,
not on trained values). Checks: deltatune and peft agree with the same LoRA weights; merging in
float32 matches the unmerged model; a training step with dropout runs and trains only the adapter.
Timings: LoRA train step (dropout 0.05 and 0), unmerged forward vs base, mixed batch of 4 adapters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import causal_lm, token_batch  # noqa: E402
from workloads import lora_model  # noqa: E402

BATCH, LENGTH = 16, 256


SETTINGS = {"device": "cuda", "quick": False}


def cuda_seconds(call, warmup: int = 3, repeats: int = 10) -> float:
    if SETTINGS["device"] != "cuda":
        warmup, repeats = 1, 1
        import time

        call()
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def model_on_gpu() -> torch.nn.Module:
    return causal_lm(quick=SETTINGS["quick"]).to(SETTINGS["device"], torch.bfloat16)


def agreement() -> dict[str, float]:
    import peft

    import deltatune

    base = model_on_gpu().eval()
    input_ids = token_batch(base, 4, 64).to(SETTINGS["device"])
    theirs = lora_model("peft", base, 0.0).eval()
    with torch.inference_mode():
        expected = theirs(input_ids=input_ids).logits.float()
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        plain = theirs.unload()
        ours = deltatune.load(plain, folder).eval()
        with torch.inference_mode():
            actual = ours(input_ids=input_ids).logits.float()
            ours.merge()
            merged = ours(input_ids=input_ids).logits.float()
    scale = expected.abs().max().item()
    return {
        "peft_vs_ours_max_abs": (actual - expected).abs().max().item(),
        "merged_vs_unmerged_max_abs": (merged - actual).abs().max().item(),
        "logit_scale": scale,
        "peft_version": peft.__version__,
    }


def training_step_with_dropout() -> dict[str, float | bool]:
    base = model_on_gpu().train()
    ours = lora_model("deltatune", base, 0.05)
    input_ids = token_batch(base, 4, 64).to(SETTINGS["device"])
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss = ours(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    unchanged = all(torch.equal(before[n], p) for n, p in ours.named_parameters() if n in before)
    return {"losses": losses, "loss_fell": losses[-1] < losses[0], "base_bit_identical": unchanged}


def every_method_on_the_device() -> dict[str, str]:
    """Each built-in method on the bf16 model on the device: a training step (finite loss, gradients
    only on the adapter) and a short greedy generation."""
    import deltatune

    configs = {
        "lora": deltatune.LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.1),
        "bitfit": deltatune.BitFitConfig(add_missing_bias=True),
        "bottleneck": deltatune.BottleneckConfig(preset="houlsby"),
        "compacter": deltatune.CompacterConfig(reduction_factor=16),
        "prompt_tuning": deltatune.PromptTuningConfig(num_virtual_tokens=8),
        "p_tuning": deltatune.PTuningConfig(num_virtual_tokens=8),
        "prefix_tuning": deltatune.PrefixTuningConfig(num_virtual_tokens=8, prefix_projection=True),
    }
    outcome = {}
    for name, config in configs.items():
        try:
            model = deltatune.attach(model_on_gpu().train(), config)
            input_ids = token_batch(model.base_model, 2, 32).to(SETTINGS["device"])
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            stray = [n for n, p in model.named_parameters() if p.grad is not None and not p.requires_grad]
            model.eval()
            with torch.inference_mode():
                tokens = model.generate(
                    input_ids=input_ids[:, :8],
                    attention_mask=torch.ones_like(input_ids[:, :8]),
                    max_new_tokens=4,
                    do_sample=False,
                )
            ok = torch.isfinite(loss).item() and not stray and tokens.shape == (2, 12)
            outcome[name] = "ok" if ok else f"loss {loss.item()}, stray grads {stray[:2]}, tokens {tuple(tokens.shape)}"
        except Exception as error:  # report every method, do not stop at the first failure
            outcome[name] = f"{type(error).__name__}: {error}"[:300]
        _free()
    return outcome


def timings() -> dict[str, float]:
    results = {}
    for library in ("deltatune", "peft"):
        for dropout in (0.05, 0.0):
            base = model_on_gpu().train()
            wrapped = lora_model(library, base, dropout)
            input_ids = token_batch(base, BATCH, LENGTH).to(SETTINGS["device"])
            optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)

            def step() -> None:
                wrapped(input_ids=input_ids, labels=input_ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            results[f"train_dropout{dropout}_{library}"] = cuda_seconds(step)
            wrapped = base = optimizer = None  # frees the GPU memory before the next model
            _free()
    base = model_on_gpu().eval()
    input_ids = token_batch(base, BATCH, LENGTH).to(SETTINGS["device"])
    with torch.inference_mode():
        results["forward_base"] = cuda_seconds(lambda: base(input_ids=input_ids))
    for library in ("deltatune", "peft"):
        wrapped = lora_model(library, model_on_gpu(), 0.0, ["a", "b", "c", "d"]).eval()
        rows = [name for name in "abcd" for _ in range(BATCH // 4)]
        with torch.inference_mode():
            results[f"forward_{library}"] = cuda_seconds(lambda: wrapped(input_ids=input_ids))
            results[f"mixed_{library}"] = cuda_seconds(lambda: wrapped(input_ids=input_ids, adapter_names=rows))
        wrapped = None  # frees the GPU memory before the next model
        _free()
    return results


def _free() -> None:
    if SETTINGS["device"] == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script itself")
    arguments = parser.parse_args()
    if arguments.dry_run:
        SETTINGS.update(device="cpu", quick=True)
    report = {
        "device": torch.cuda.get_device_name() if SETTINGS["device"] == "cuda" else "cpu",
        "torch": torch.__version__,
        "agreement": agreement(),
        "training": training_step_with_dropout(),
        "methods": every_method_on_the_device(),
        "timings": timings(),
    }
    t = report["timings"]
    report["ratios"] = {
        "train_dropout0.05_ours_vs_peft": t["train_dropout0.05_deltatune"] / t["train_dropout0.05_peft"],
        "train_dropout0.0_ours_vs_peft": t["train_dropout0.0_deltatune"] / t["train_dropout0.0_peft"],
        "forward_ours_vs_base": t["forward_deltatune"] / t["forward_base"],
        "forward_peft_vs_base": t["forward_peft"] / t["forward_base"],
        "mixed_ours_vs_peft": t["mixed_deltatune"] / t["mixed_peft"],
        "mixed_ours_vs_single": t["mixed_deltatune"] / t["forward_deltatune"],
    }
    Path(arguments.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
