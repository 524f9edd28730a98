"""LoftQ on a 4-bit base (`deltatune.replace_lora_weights_loftq`): s·B A is the best rank-r
approximation of the quantization error W − Q (checked against the error's own singular values), the
model moves toward the float model, the packed base stays bit-identical; equal to peft 0.21's
`replace_lora_weights_loftq` where that runs (peft computes it on CUDA only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def test_deltatune_train_starts_loftq_on_its_quantized_base_and_the_loss_falls(tmp_path) -> None:
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import prepare_run, train
    from training_fixtures import task_config

    adapter = {"method": "lora", "r": 4, "lora_alpha": 4, "target_modules": "all-linear", "init_lora_weights": "loftq"}
    settings = {"arch": "llama-64", "batch_size": 8, "max_steps": 6, "learning_rate": 0.01, "quantize": "nf4"}
    config = TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", method=adapter, **settings))
    started = prepare_run(config).delta_model
    folder = Path(config.model)
    weights = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for module_name, site in started.sites():
        module, layer = started.base_model.get_submodule(module_name), site.adapters["default"]
        error = weights[f"{module_name}.weight"] - quantized_linear(module).dequantize(module)
        fitted = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
        torch.testing.assert_close(
            torch.linalg.matrix_norm(error - fitted),
            torch.linalg.svdvals(error)[4:].square().sum().sqrt(),
            atol=1e-5,
            rtol=1e-4,
        )
    train(config, progress=False)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]


def test_loftq_in_deltatune_train_needs_quantize(tmp_path) -> None:
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import prepare_run
    from training_fixtures import task_config

    adapter = {"method": "lora", "r": 4, "target_modules": "all-linear", "init_lora_weights": "loftq"}
    config = TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", method=adapter))
    with pytest.raises(deltatune.DeltaTuneError, match=r"init_lora_weights: loftq .*set quantize"):
        prepare_run(config)


def test_a_loftq_adapter_saved_for_peft_loads_there_on_the_same_quantized_base(tmp_path) -> None:
    """peft's own "loftq" init would quantize the base again on load: the folder says True, the factors
    are in the file."""
    import peft

    config = deltatune.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq")
    delta_model = deltatune.attach(build("llama-nf4"), config)
    deltatune.replace_lora_weights_loftq(delta_model, _saved_llama_64())
    delta_model.save(str(tmp_path), format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(build("llama-nf4"), str(tmp_path)).eval()
    torch.testing.assert_close(run(theirs, "llama"), run(delta_model.eval(), "llama"), atol=1e-5, rtol=0)
