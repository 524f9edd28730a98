"""LoRA's initialisations from the base weight (PiSSA, OLoRA, orthogonal) against peft 0.21's, on the
same base weights: the same factors from the same seed, the same outputs (atol 1e-5) while our base
stays bit-identical, and peft's PiSSA folders of both kinds (converted to plain LoRA of rank 2r, or
not) loading here with peft's outputs after training; ours convert to the tensors peft's conversion writes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch

import deltatune
from deltatune.files import read_tensors
from deltatune.peft_releases import LATER_KEYS
from tiny_models import ARCHS, build, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "pissa_niter_2", "olora", "orthogonal"]


def configs(init: str, targets=TARGETS, **options) -> tuple[deltatune.LoraConfig, peft.LoraConfig]:
    fields = {"r": 4, "lora_alpha": 8, "target_modules": list(targets), "init_lora_weights": init, **options}
    return deltatune.LoraConfig(**fields), peft.LoraConfig(**fields)


def both(base: torch.nn.Module, init: str, seed: int = 5, **options) -> tuple[deltatune.DeltaModel, peft.PeftModel]:
    """Our adapter and peft's on copies of `base`, each made right after `torch.manual_seed(seed)`."""
    ours_config, peft_config = configs(init, **options)
    torch.manual_seed(seed)
    ours = deltatune.attach(copy.deepcopy(base), ours_config)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    return ours, theirs


def train_steps(model: torch.nn.Module, steps: int = 3, learning_rate: float = 0.05) -> None:
    """A few plain SGD steps on one fixed batch (the same for every model)."""
    inputs = ARCHS["llama"].inputs(11)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    for _ in range(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def peft_factors(theirs: peft.PeftModel) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A": ..., "lora_B": ...}} of peft's adapter "default"."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in theirs.state_dict().items():
        for factor in ("lora_A", "lora_B"):
            if f".{factor}.default.weight" in key:
                module = key.removeprefix("base_model.model.").split(f".{factor}.")[0]
                found.setdefault(module, {})[factor] = tensor
    return found


def assert_base_untouched(ours: deltatune.DeltaModel, base: torch.nn.Module) -> None:
    original = base.state_dict()
    assert all(torch.equal(ours.base_model.get_parameter(name), original[name]) for name in original)


# ----------------------------------------------------------------------------- the start
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_same_seed_gives_peft_factors_and_outputs_on_an_untouched_base(init: str, arch: str) -> None:
    if init == "olora" and arch == "gpt2":
        pytest.skip("peft's OLoRA fails on GPT-2's Conv1D; deltatune refuses it (the olora-conv1d refusal below)")
    base = build(arch)
    ours, theirs = both(base, init, targets=["c_attn", "c_fc"] if arch == "gpt2" else TARGETS)
    expected = peft_factors(theirs)
    sites = {name: site.adapters["default"] for name, site in ours.sites()}
    assert sites.keys() == expected.keys()
    for name, adapter in sites.items():
        torch.testing.assert_close(adapter.lora_A, expected[name]["lora_A"], atol=1e-6, rtol=0)
        torch.testing.assert_close(adapter.lora_B, expected[name]["lora_B"], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(ours, arch), run(theirs, arch), atol=ATOL, rtol=0)
    torch.testing.assert_close(run(ours, arch), run(base, arch), atol=ATOL, rtol=0)
    assert_base_untouched(ours, base)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_initial_term_is_what_peft_takes_out_of_the_weight(init: str) -> None:
    """peft's residual W_res = W − s·B₀A₀ equals W minus our frozen initial term, layer by layer."""
    base = build("llama")
    ours, theirs = both(base, init)
    for name, site in ours.sites():
        adapter = site.adapters["default"]
        initial = adapter.scaling * adapter.lora_B0 @ adapter.lora_A0
        residual = theirs.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(base.get_submodule(name).weight - initial, residual, atol=1e-6, rtol=0)
        top = torch.linalg.svd(base.get_submodule(name).weight, full_matrices=False)
        if init == "pissa":  # the best rank-r part of W (Eckart-Young): its singular values are W's top r
            torch.testing.assert_close(torch.linalg.svdvals(initial)[:4], top.S[:4], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- peft's folders, trained
def test_a_trained_peft_pissa_adapter_saved_with_and_without_conversion_loads_with_peft_outputs(tmp_path: Path) -> None:
    """Issue 13's done-when 2: peft's PiSSA adapter trained a few SGD steps on a fixed batch, saved
    both ways, loads here on the original base with peft's outputs; ours, trained the same steps from
    the same start, converts to the tensors (and config) peft's conversion writes."""
    base = build("llama")
    ours, theirs = both(base, "pissa")
    theirs.save_pretrained(str(tmp_path / "initial"))
    train_steps(theirs)
    train_steps(ours)
    expected = run(theirs, "llama")
    assert (expected - run(base, "llama")).abs().max() > 1e-3
    theirs.save_pretrained(str(tmp_path / "unconverted"))
    theirs.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    for kind in ("unconverted", "converted"):
        loaded = deltatune.load(copy.deepcopy(base), str(tmp_path / kind))
        torch.testing.assert_close(run(loaded, "llama"), expected, atol=ATOL, rtol=0, msg=kind)
        assert_base_untouched(loaded, base)
    torch.testing.assert_close(run(ours, "llama"), expected, atol=ATOL, rtol=0)

    deltatune.to_plain_lora(ours, "default", "plain")
    ours.save(str(tmp_path / "ours-converted"), ["plain"], format="peft")
    mine = read_tensors(tmp_path / "ours-converted" / "adapter_model.safetensors")
    peft_converted = read_tensors(tmp_path / "converted" / "adapter_model.safetensors")
    assert mine.keys() == peft_converted.keys()
    for key, tensor in peft_converted.items():
        torch.testing.assert_close(mine[key], tensor, atol=ATOL, rtol=0, msg=key)
    their_config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    my_config = json.loads((tmp_path / "ours-converted" / "adapter_config.json").read_text())
    left_out = {key: entry.absent_reads for key, entry in LATER_KEYS["LORA"].items()}  # what a missing key reads as
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert my_config.get(key, left_out.get(key)) == their_config[key], key


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_our_trained_adapter_saved_unconverted_loads_in_peft_on_the_original_base(init: str, tmp_path: Path) -> None:
    """peft recomputes PiSSA's and OLoRA's residual base from the original one when it loads such a folder."""
    base = build("llama")
    ours = deltatune.attach(copy.deepcopy(base), configs(init)[0])
    train_steps(ours)
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(run(theirs, "llama"), run(ours, "llama"), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3.0}}],
    ids=["plain", "rslora-patterns"],
)
def test_the_converted_adapter_is_the_same_function_here_and_in_peft(options: dict, tmp_path: Path) -> None:
    """Rank 2r with the scale kept at every module, rsLoRA and patterns too (where peft refuses to convert)."""
    base = build("llama")
    ours = deltatune.attach(copy.deepcopy(base), configs("pissa", **options)[0])
    train_steps(ours)
    expected = run(ours, "llama")
    deltatune.to_plain_lora(ours, "default", "plain")
    ours.activate("plain")
    torch.testing.assert_close(run(ours, "llama"), expected, atol=ATOL, rtol=0)
    ours.save(str(tmp_path), ["plain"], format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(run(theirs, "llama"), expected, atol=ATOL, rtol=0)


def test_a_randomized_pissa_adapter_saves_for_peft_only_converted(tmp_path: Path) -> None:
    """peft redraws "pissa_niter_K"'s randomized SVD on load: an unconverted folder is refused, ours
    (which keeps the drawn factors) and the converted one load with the same outputs."""
    base = build("llama")
    ours = deltatune.attach(copy.deepcopy(base), configs("pissa_niter_2")[0])
    train_steps(ours)
    expected = run(ours, "llama")
    with pytest.raises(deltatune.DeltaTuneError, match=r"pissa_niter_2.*redraws.*to_plain_lora"):
        ours.save(str(tmp_path / "peft"), format="peft")
    ours.save(str(tmp_path / "ours"))
    torch.manual_seed(123)  # another draw would give other factors: they come from the file
    torch.testing.assert_close(
        run(deltatune.load(copy.deepcopy(base), str(tmp_path / "ours")), "llama"), expected, atol=0, rtol=0
    )
    deltatune.to_plain_lora(ours, "default", "plain")
    ours.save(str(tmp_path / "converted"), ["plain"], format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "converted")).eval()
    torch.testing.assert_close(run(theirs, "llama"), expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("arch", "options", "message"),
    [
        ("llama", {"init_lora_weights": "orthogonal", "r": 3}, r"'orthogonal' needs an even rank, got r=3"),
        ("llama", {"init_lora_weights": "pissa", "r": 40}, r"pissa needs a rank of at most min\(out, in\) = 32"),
        ("gpt2", {"init_lora_weights": "olora", "target_modules": ["c_attn"]}, r"'olora' runs on Linear layers"),
        ("llama", {"init_lora_weights": "pissa", "target_modules": ["embed_tokens"]}, r"Linear and Conv1D layers"),
        ("llama", {"init_lora_weights": "pissa", "use_dora": True}, r"'pissa' with use_dora is not implemented"),
    ],
    ids=["odd-orthogonal", "rank-too-high", "olora-conv1d", "embedding", "dora"],
)
def test_an_init_that_cannot_run_is_refused_in_one_line(arch: str, options: dict, message: str) -> None:
    fields = {"r": 4, "target_modules": ["q_proj"], **options}
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        deltatune.attach(build(arch), deltatune.LoraConfig(**fields))


def test_only_a_base_rewriting_adapter_converts() -> None:
    delta_model = deltatune.attach(build("llama"), deltatune.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(deltatune.DeltaTuneError, match=r"'default' is already a plain adapter"):
        deltatune.to_plain_lora(delta_model, "default", "plain")
    assert "plain" not in delta_model.records


# ----------------------------------------------------------------------------- deltatune train
PISSA_ADAPTER = {
    "method": "lora",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": "all-linear",
    "init_lora_weights": "pissa",
}


def test_deltatune_train_with_pissa_leaves_the_base_alone_and_its_loss_falls(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import train
    from training_fixtures import task_config

    config = TrainConfig.from_yaml(task_config(tmp_path, "causal-lm", method=PISSA_ADAPTER))
    result = train(config, progress=False)
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    trained = [entry["loss"] for entry in history if "loss" in entry]
    assert trained[-1] < trained[0]
    fresh = AutoModelForCausalLM.from_pretrained(config.model).eval()
    delta_model = result.run.delta_model.eval()
    assert_base_untouched(delta_model, fresh)
    inputs = ARCHS["llama"].inputs(3)
    loaded = deltatune.load(fresh, str(tmp_path / "out" / "adapter"))
    torch.testing.assert_close(loaded(**inputs).logits, delta_model(**inputs).logits, atol=0, rtol=0)


def test_a_randomized_pissa_run_resumes_bit_exactly(tmp_path: Path) -> None:
    """The drawn initial factors are saved with the checkpoint's adapter (as in any folder of ours)."""
    from resume_checks import RESUME_SETTINGS, assert_resume_equals_the_uninterrupted_run
    from training_fixtures import task_config

    settings = {**RESUME_SETTINGS, "adapter": {**PISSA_ADAPTER, "init_lora_weights": "pissa_niter_2"}}
    assert_resume_equals_the_uninterrupted_run(task_config(tmp_path, "causal-lm", **settings), tmp_path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_combining_an_adapter_started_from_the_base_is_refused_and_its_plain_form_combines_exactly(init: str) -> None:
    """Its delta is s·(BA − B₀A₀): combining A and B alone would drop the frozen start (0.2 off in the logits)."""
    delta_model = deltatune.attach(
        build("llama"), deltatune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    )
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters("default"):
            parameter.add_(0.1 * torch.randn_like(parameter))
    expected = run(delta_model.eval(), "llama")
    with pytest.raises(deltatune.DeltaTuneError, match="to_plain_lora"):
        delta_model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")
    assert "combined" not in delta_model.configs
    deltatune.to_plain_lora(delta_model, "default", "plain")
    delta_model.add_weighted_adapter(["plain"], [1.0], "combined", combination_type="cat")
    delta_model.activate("combined")
    torch.testing.assert_close(run(delta_model, "llama"), expected, atol=1e-5, rtol=0)
