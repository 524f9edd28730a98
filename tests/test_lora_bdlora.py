"""BD-LoRA (`use_bdlora`) against peft 0.21 on the tiny Llama: with the same blocks, the same outputs, the same
merged weights and the same files both ways; peft's init scale for a fresh block-diagonal A; and a clear
error for each layout that cannot be block-diagonal."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.errors import DeltaTuneError, UnsupportedModuleError
from deltatune.train.cli import main
from resume_checks import RESUME_SETTINGS
from test_peft_crosscheck import assert_changed, assert_same, assert_same_parameter
from tiny_models import build, run
from training_fixtures import task_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SERVING = {
    "target_modules_bd_a": ["o_proj", "down_proj"],
    "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"],
}
"""peft's advice for tensor-parallel serving: block-diagonal A on row-parallel layers, B on column-parallel ones."""


def options(nblocks: int = 2, **bdlora) -> dict:
    return {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": list(TARGETS),
        "init_lora_weights": False,
        "use_bdlora": {**SERVING, "nblocks": nblocks, **bdlora},
    }


def perturbed(model: nn.Module) -> nn.Module:
    """Every LoRA factor moved by noise (peft's block-diagonal B starts at zero even with init False)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def peft_folder(folder: Path, nblocks: int = 2) -> tuple[nn.Module, peft.PeftModel]:
    base = build("llama")
    theirs = perturbed(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options(nblocks))))
    theirs.save_pretrained(str(folder))
    return base, theirs


@pytest.mark.parametrize("nblocks", [2, 4])
def test_peft_bdlora_folder_loads_with_peft_outputs(nblocks: int, tmp_path: Path) -> None:
    base, theirs = peft_folder(tmp_path, nblocks)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    expected = run(theirs, "llama")
    assert_changed(expected, run(base, "llama"))
    assert_same(run(ours, "llama"), expected)


def test_our_bdlora_folder_loads_in_peft_with_our_outputs_and_holds_peft_tensors(tmp_path: Path) -> None:
    base = build("llama")
    ours = perturbed(deltatune.attach(copy.deepcopy(base), deltatune.LoraConfig(**options())))
    ours.save(str(tmp_path / "ours"), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    expected = run(ours, "llama")
    assert_changed(expected, run(base, "llama"))
    assert_same(run(theirs, "llama"), expected)

    peft_folder(tmp_path / "peft")
    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}
    block_a = next(k for k in our_tensors if k.endswith("layers.0.mlp.down_proj.lora_A.weight"))
    block_b = next(k for k in our_tensors if k.endswith("layers.0.mlp.up_proj.lora_B.weight"))
    assert our_tensors[block_a].shape == (4, 64 // 2) and our_tensors[block_b].shape == (64, 4 // 2)


def test_bdlora_merge_equals_peft_merge_and_unload(tmp_path: Path) -> None:
    base, theirs = peft_folder(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    unmerged = run(ours, "llama")
    merged_theirs = theirs.merge_and_unload()
    ours.merge()
    assert_same(run(ours, "llama"), unmerged)
    for name, parameter in merged_theirs.named_parameters():
        assert_same_parameter(ours.base_model.get_parameter(name), parameter, name)
    ours.unmerge()
    assert_same(run(ours.unload(merge=True), "llama"), run(merged_theirs, "llama"))


def test_bdlora_gradients_of_the_blocks_equal_peft(tmp_path: Path) -> None:
    """Training mode without dropout: the same loss gives the same gradient on every block of A and B."""
    base, theirs = peft_folder(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path), trainable=True)
    for model in (ours, theirs):
        model.train()
        run(model, "llama").float().pow(2).mean().backward()
    checked = 0
    for module_name, site in ours.sites():
        peft_layer = theirs.base_model.model.get_submodule(module_name)
        for factor in ("lora_A", "lora_B"):
            ours_grad = getattr(site.adapters["default"], factor).grad
            peft_grad = getattr(peft_layer, factor)["default"].weight.grad
            assert_same_parameter(ours_grad, peft_grad, f"{module_name}.{factor}")
            checked += 1
    assert checked == 2 * 2 * len(TARGETS)


def test_bdlora_mixed_batch_rows_equal_each_adapter_run_alone_in_peft(tmp_path: Path) -> None:
    base = build("llama")
    theirs = perturbed(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options(2)), adapter_name="a"))
    theirs.add_adapter("b", peft.LoraConfig(**options(4)))
    perturbed(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path / "a"), name="a")
    ours = deltatune.load(ours, str(tmp_path / "b"), name="b").eval()
    alone = {}
    for name in ("a", "b"):
        theirs.set_adapter(name)
        alone[name] = run(theirs, "llama")
    mixed = run(ours, "llama", adapter_names=["a", "b", None])
    assert_same(mixed[0], alone["a"][0])
    assert_same(mixed[1], alone["b"][1])
    assert_same(mixed[2], run(base, "llama")[2])


def test_a_fresh_block_diagonal_a_has_peft_init_scale_and_b_starts_at_zero() -> None:
    """peft draws a block-diagonal A Kaiming-uniform over the block's fan-in (gain √2: bound √(6 n / in)),
    not plain LoRA's bound 1/√in; a block-diagonal B starts at zero, so the model starts at the base."""
    base = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    config = {
        "r": 16,
        "target_modules": ["0", "1"],
        "use_bdlora": {"target_modules_bd_a": ["0"], "target_modules_bd_b": ["1"], "nblocks": 4},
    }
    ours = deltatune.attach(copy.deepcopy(base), deltatune.LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(config)))
    our_a = dict(ours.sites())["0"].adapters["default"].lora_A
    their_a = theirs.base_model.model[0].lora_A["default"].weight
    assert our_a.shape == their_a.shape == (16, 64)
    torch.testing.assert_close(our_a.std(), their_a.std(), rtol=0.15, atol=0)
    assert our_a.abs().max() <= (6 / 64) ** 0.5
    assert not dict(ours.sites())["1"].adapters["default"].lora_B.any()
    x = torch.randn(3, 256)
    assert torch.equal(ours(x), base(x))


def test_bdlora_refusals_name_the_layer_and_what_to_change() -> None:
    with pytest.raises(DeltaTuneError, match=r"model.layers.0.self_attn.q_proj matches neither .*match_strict=False"):
        deltatune.attach(build("llama"), deltatune.LoraConfig(target_modules=["q_proj"], use_bdlora={"nblocks": 2}))
    with pytest.raises(DeltaTuneError, match=r"q_proj matches both target_modules_bd_a and target_modules_bd_b"):
        deltatune.attach(
            build("llama"),
            deltatune.LoraConfig(
                target_modules=["q_proj"], use_bdlora={"target_modules_bd_a": ["proj"], "target_modules_bd_b": ["q_"]}
            ),
        )
    with pytest.raises(DeltaTuneError, match=r"lists \['q_proj'\] in both"):
        deltatune.LoraConfig(use_bdlora={"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["q_proj"]})
    with pytest.raises(UnsupportedModuleError, match=r"nblocks=3 to divide the rank \(6\) and the 32 output features"):
        deltatune.attach(
            build("llama"),
            deltatune.LoraConfig(
                r=6, target_modules=["q_proj"], use_bdlora={"target_modules_bd_b": ["q_proj"], "nblocks": 3}
            ),
        )
    with pytest.raises(UnsupportedModuleError, match=r"nn.Linear layers only .* Embedding"):
        deltatune.attach(
            build("llama"),
            deltatune.LoraConfig(target_modules=["embed_tokens"], use_bdlora={"target_modules_bd_a": ["embed"]}),
        )
    with pytest.raises(DeltaTuneError, match=r"use_bdlora does not combine with use_dora=True"):
        deltatune.LoraConfig(use_dora=True, use_bdlora={"target_modules_bd_a": ["q_proj"]})
    with pytest.raises(DeltaTuneError, match=r"use_bdlora does not combine with init_lora_weights='pissa'"):
        deltatune.LoraConfig(init_lora_weights="pissa", use_bdlora={"target_modules_bd_a": ["q_proj"]})


def test_add_weighted_adapter_refuses_block_diagonal_adapters(tmp_path: Path) -> None:
    base, _ = peft_folder(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path), name="a")
    ours.add("b", deltatune.LoraConfig(**options()))
    with pytest.raises(DeltaTuneError, match=r"cannot combine a, b: a block-diagonal factor"):
        ours.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="cat")


# ----------------------------------------------------------------------------- deltatune train
YAML_ADAPTER = {
    "method": "lora",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": "all-linear",
    "use_bdlora": {**SERVING, "nblocks": 2, "match_strict": False},
}


def test_training_from_yaml_with_bdlora_loss_falls(tmp_path: Path) -> None:
    config = task_config(tmp_path, "causal-lm", method=YAML_ADAPTER, eval_file=None)
    assert main(["train", str(config), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_a_lora_checkpoint_that_predates_use_bdlora_resumes_without_it(tmp_path: Path, capsys) -> None:
    config = task_config(tmp_path, "causal-lm", **RESUME_SETTINGS)
    assert main(["train", str(config), "--quiet"]) == 0
    shutil.rmtree(tmp_path / "out" / "adapter")
    state_file = tmp_path / "out" / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run"]["fingerprint"]["adapter.use_bdlora"]  # as a checkpoint written before the field existed
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert (
        main(["train", str(config), "--quiet", "--resume", "adapter.use_bdlora={nblocks: 2, match_strict: false}"]) == 2
    )
    assert "other settings (adapter.use_bdlora" in capsys.readouterr().err
    assert main(["train", str(config), "--quiet", "--resume"]) == 0
