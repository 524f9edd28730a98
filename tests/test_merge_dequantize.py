"""`deltatune merge --quantize NAME --dequantize [--requantize NAME]`: an adapter trained on a quantized
base merged without losing it. The references are peft (the adapter unmerged on the same quantized
base), transformers' own loader (the written folders load with `from_pretrained` and nothing else) and
transformers' own `dequantize()`.

The adapter adapts only the upper block, so the lower block's quantized layers have no adapter: a
dequantized merge must dequantize those too. bitsandbytes' 4-bit layers are run in training mode, where
they dequantize and compute in float32 (see tests/test_quantized.py); these models have no dropout."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.quantized import is_quantized
from deltatune.requantize import dequantize_model
from deltatune.train.cli import main
from deltatune.train.models import load_model
from test_quantized import case, installed, needs_bitsandbytes, quantizable_llama, relative
from training_fixtures import word_tokenizer

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

VOCAB = 96
KINDS = [case("nf4"), case("int8")]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 64-wide fp32 Llama with a tokenizer, saved (64: bitsandbytes' 4-bit block size)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    quantizable_llama().save_pretrained(folder)
    word_tokenizer(pair_template=False).save_pretrained(folder)
    return folder


def inputs(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model.train()(input_ids=inputs(seed)).logits


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per base kind, a LoRA adapter trained on that quantized base (upper block only), saved in
    deltatune's format (`kind`) and in peft's (`kind-peft`)."""
    folders = {}
    for kind in ("nf4", "int8"):
        if not installed("bitsandbytes"):  # its tests skip
            continue
        torch.manual_seed(0)
        model = deltatune.attach(
            load_model(str(base), quantize=kind).train(),
            deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", layers_to_transform=[1]),
        )
        optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-2)
        for _ in range(8):
            model(input_ids=inputs(1), labels=inputs(1)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        folders[kind] = tmp_path_factory.mktemp(f"adapter-{kind}")
        folders[f"{kind}-peft"] = tmp_path_factory.mktemp(f"adapter-{kind}-peft")
        model.save(str(folders[kind]))
        model.save(str(folders[f"{kind}-peft"]), format="peft")
    return folders


def digest(*folders: Path) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def peft_unmerged(base: Path, adapters: dict[str, Path], kind: str) -> torch.Tensor:
    """The reference: peft's model of the adapter, unmerged, on the same quantized base."""
    model = peft.PeftModel.from_pretrained(load_model(str(base), quantize=kind), str(adapters[f"{kind}-peft"]))
    return logits(model)


def merge(base: Path, adapter: Path, out: Path, *options: str) -> None:
    assert main(["merge", str(base), str(adapter), str(out), *options]) == 0


def linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear) or is_quantized(module)]


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_merge_is_a_plain_checkpoint_equal_to_the_unmerged_adapter_on_the_quantized_base(
    base: Path, adapters: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    before = digest(base, adapters[kind])
    merge(base, adapters[kind], tmp_path / "merged", "--quantize", kind, "--dequantize")
    assert digest(base, adapters[kind]) == before

    config = json.loads((tmp_path / "merged" / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert len(linears(merged)) == 15  # 7 per block and the head
    assert all(type(module) is torch.nn.Linear for module in linears(merged))  # the unadapted block's too
    assert all(parameter.dtype == torch.float32 for parameter in merged.parameters())
    expected = peft_unmerged(base, adapters, kind)
    assert relative(logits(load_model(str(base), quantize=kind)), expected) > 1e-2  # the adapter matters
    assert relative(logits(merged), expected) < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


@needs_bitsandbytes
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_dequantized_merge_is_written_in_the_dtype_asked_for(
    base: Path, adapters: dict[str, Path], name: str, tmp_path: Path
) -> None:
    dtype = getattr(torch, name)
    merge(base, adapters["nf4"], tmp_path / "merged", "--quantize", "nf4", "--dequantize", "--dtype", name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert {parameter.dtype for parameter in merged.parameters()} == {dtype}
    expected = peft_unmerged(base, adapters, "nf4")
    assert relative(logits(merged).float(), expected) < 2e-2  # the rounding of 16-bit weights


@needs_bitsandbytes
def test_a_plain_merge_is_written_in_the_dtype_asked_for(base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    merge(base, adapters["nf4"], tmp_path / "float32")
    merge(base, adapters["nf4"], tmp_path / "float16", "--dtype", "float16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "float16", dtype="auto")
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.float16}
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "float32"))
    assert relative(logits(merged).float(), expected) < 2e-2


@pytest.mark.parametrize("kind", KINDS)
def test_requantized_merge_loads_quantized_and_differs_from_the_merge_by_quantization_rounding_only(
    base: Path, adapters: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    """The requantized merge is off the dequantized merge by the rounding of `kind`, which is measured
    by quantizing the full-precision base alone: a requantized weight that kept its adapter is no
    further from the merged weight (relative to that weight) than the quantized base is from the
    full-precision base, and the logits stay as close (up to a factor 2: the adapter moves the block
    scales) while the adapter's own effect is many times larger."""
    before = digest(base, adapters[kind])
    merge(base, adapters[kind], tmp_path / "merged", "--quantize", kind, "--dequantize")
    merge(base, adapters[kind], tmp_path / "requantized", "--quantize", kind, "--requantize", kind)
    assert digest(base, adapters[kind]) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "requantized"]  # no temporary left

    config = json.loads((tmp_path / "requantized" / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "requantized")
    assert sum(is_quantized(module) for module in requantized.modules()) == 14  # every linear but the head
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")

    def weight_error(quantized: torch.nn.Module, full: torch.nn.Module) -> float:
        """The largest relative (Frobenius) error of a quantized layer's weight against its full one."""
        pairs = zip(dequantize_model(quantized).modules(), full.modules())
        return max(
            (torch.linalg.norm(ours.weight - theirs.weight) / torch.linalg.norm(theirs.weight)).item()
            for ours, theirs in pairs
            if isinstance(theirs, torch.nn.Linear) and theirs is not full.lm_head
        )

    full_base = AutoModelForCausalLM.from_pretrained(base)
    base_rounding = relative(logits(load_model(str(base), quantize=kind)), logits(full_base))
    rounding = relative(logits(requantized), logits(merged))
    adapter_effect = relative(logits(load_model(str(base), quantize=kind)), logits(merged))
    assert rounding < 2 * base_rounding
    assert rounding < adapter_effect / 5
    assert weight_error(requantized, merged) <= 1.1 * weight_error(load_model(str(base), quantize=kind), full_base)


QUANTIZED_BASES = {
    "quantized-at-load": lambda base, tmp_path: (base, ["--quantize", "nf4"]),
    "a-quantized-checkpoint": lambda base, tmp_path: (_saved_quantized(base, tmp_path), []),
}


def _saved_quantized(base: Path, tmp_path: Path) -> Path:
    load_model(str(base), quantize="nf4").save_pretrained(tmp_path / "nf4-checkpoint")
    return tmp_path / "nf4-checkpoint"


@pytest.mark.parametrize("source,kind", [case(name, "nf4") for name in QUANTIZED_BASES])
def test_merge_into_a_quantized_base_without_dequantize_is_refused_in_one_line_naming_it(
    base: Path, adapters: dict[str, Path], source: str, kind: str, tmp_path: Path, capsys
) -> None:
    model, options = QUANTIZED_BASES[source](base, tmp_path)
    before = digest(model, adapters["nf4"])
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(model), str(adapters["nf4"]), str(out), *options]) == 2
    error = capsys.readouterr().err  # transformers' loading progress bars may come before the message
    ours = [line for line in error.splitlines() if line.startswith("deltatune: ")]
    assert len(ours) == 1 and error.strip().endswith(ours[0]) and "Traceback" not in error, error
    assert "--dequantize" in ours[0]
    assert not out.exists()
    assert digest(model, adapters["nf4"]) == before


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_model_matches_transformers_own_dequantize(base: Path, kind: str) -> None:
    ours = dequantize_model(load_model(str(base), quantize=kind))
    quantized = load_model(str(base), quantize=kind)
    takes_dtype = "dtype" in inspect.signature(quantized.dequantize).parameters  # transformers 5; 4.57: none
    theirs = quantized.dequantize(**({"dtype": torch.float32} if takes_dtype else {}))
    assert not hasattr(ours.config, "quantization_config") and not getattr(ours, "is_quantized", False)
    assert all(type(module) is torch.nn.Linear for module in linears(ours))
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for name, value in theirs_state.items():
        torch.testing.assert_close(ours_state[name], value, atol=1e-6, rtol=0, msg=name)
