"""LoftQ on a 4-bit base (`deltatune.replace_lora_weights_loftq`): s·B A is the best rank-r
approximation of the quantization error W − Q (checked against the error's own singular values), the
model moves toward the float model, the packed base stays bit-identical; equal to peft 0.21's
`replace_lora_weights_loftq` where that runs (peft computes it on CUDA only)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.quantized import quantized_linear
from tiny_models import _saved_llama_64, build, run

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None,
        reason="bitsandbytes is not installed (pip install deltatune[quantized])",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
]


def float_weights() -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(_saved_llama_64(), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("alpha", [4, 16])
def test_the_adapter_is_the_best_rank_r_fit_of_the_quantization_error_and_the_base_stays(alpha: int) -> None:
    delta_model = deltatune.attach(build("llama-nf4"), deltatune.LoraConfig(r=4, lora_alpha=alpha))
    before = {
        key: value.clone() for key, value in delta_model.base_model.state_dict().items() if "deltatune" not in key
    }
    started = deltatune.replace_lora_weights_loftq(delta_model, _saved_llama_64())
    assert sorted(started) == sorted(delta_model.targets["default"])
    weights = float_weights()
    for module_name, site in delta_model.sites():
        module, adapter = delta_model.base_model.get_submodule(module_name), site.adapters["default"]
        error = weights[f"{module_name}.weight"] - quantized_linear(module).dequantize(module)
        left = error - adapter.scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
        optimal = torch.linalg.svdvals(error)[4:].square().sum().sqrt()  # Eckart-Young
        torch.testing.assert_close(torch.linalg.matrix_norm(left), optimal, atol=1e-5, rtol=1e-4, msg=module_name)
        assert optimal < torch.linalg.matrix_norm(error)
    after = {key: value for key, value in delta_model.base_model.state_dict().items() if "deltatune" not in key}
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_the_model_moves_toward_the_float_model() -> None:
    float_model = AutoModelForCausalLM.from_pretrained(_saved_llama_64(), dtype=torch.float32).eval()
    delta_model = deltatune.attach(
        build("llama-nf4"), deltatune.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear")
    )
    expected = run(float_model, "llama")
    quantized_gap = (run(delta_model, "llama") - expected).abs().mean()
    deltatune.replace_lora_weights_loftq(delta_model, _saved_llama_64())
    assert (run(delta_model, "llama") - expected).abs().mean() < 0.8 * quantized_gap


def test_loftq_needs_a_quantized_base_and_the_float_weights(tmp_path) -> None:
    plain = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4))
    with pytest.raises(deltatune.DeltaTuneError, match=r"no LoRA layer on a quantized linear"):
        deltatune.replace_lora_weights_loftq(plain, _saved_llama_64())
    with pytest.raises(deltatune.DeltaTuneError, match=r"holds no \.safetensors file"):
        deltatune.replace_lora_weights_loftq(
            deltatune.attach(build("llama-nf4"), deltatune.LoraConfig(r=4)), str(tmp_path)
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft's replace_lora_weights_loftq computes on CUDA only")
def test_the_factors_equal_peft_on_cuda_with_unit_scale() -> None:
    import peft
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    def quantized() -> torch.nn.Module:
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(_saved_llama_64(), quantization_config=config, device_map="cuda")

    lora = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    theirs = peft.get_peft_model(quantized(), peft.LoraConfig(**lora))
    replace_lora_weights_loftq(theirs, model_path=_saved_llama_64())
    ours = deltatune.attach(quantized(), deltatune.LoraConfig(**lora))
    deltatune.replace_lora_weights_loftq(ours, _saved_llama_64())
    state = theirs.state_dict()
    for module_name, site in ours.sites():
        adapter = site.adapters["default"]
        theirs_delta = (
            state[f"base_model.model.{module_name}.lora_B.default.weight"]
            @ state[f"base_model.model.{module_name}.lora_A.default.weight"]
        )
        torch.testing.assert_close(adapter.lora_B @ adapter.lora_A, theirs_delta, atol=1e-4, rtol=0)
    torch.testing.assert_close(run(ours, "llama"), run(theirs, "llama"), atol=1e-4, rtol=0)
