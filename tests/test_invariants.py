"""The invariant table: every built-in method × every tiny architecture (DESIGN.md §7).

A method added to the library without a case here fails `test_every_builtin_method_has_a_case`.
Adapters are given random weights (`randomize`) wherever an invariant needs a non-trivial delta.
A case named `method-variant` runs a variant of that method (`lora-dora`: LoRA with `use_dora`,
`lora-parameters`: LoRA on bare parameters).
A case says which invariants apply to its method (`mergeable`, `zero_init`) and on which
architectures it runs; the tests of an invariant run over the cases it applies to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import deltatune
from tiny_models import ARCHS, build, run

ARCH_NAMES = ["llama", "gpt2", "bert", "t5", "mlp"]
TOKENS = list(range(10, 60))
"""Token ids whose rows train in the trainable-token cases."""


@dataclass(frozen=True)
class Case:
    config: Callable[[str], deltatune.DeltaConfig]
    archs: tuple[str, ...] = tuple(ARCH_NAMES)
    mergeable: bool = True
    zero_init: bool = True
    mixed_batch: bool = True
    keeps_model_dtype: bool = False
    """The parameters stay in the model's dtype, as peft's do (a copy run in the layer's place: LN tuning);
    test_adapter_dtype's float32 checks leave the case out."""
    keeps_base: bool = True
    """The base stays bit-identical under the adapter; False for full fine-tuning, which trains the base's own
    weights: no base to give back (unload, disabled()) and one such adapter per model (tests/test_full.py)."""


PARAMETER_TARGETS = {
    "llama": ["q_proj.weight", "v_proj.weight", "mlp.down_proj.weight"],
    "gpt2": ["attn.c_attn.weight", "mlp.c_fc.weight"],
    "bert": ["query.weight", "value.weight"],
    "t5": ["SelfAttention.q.weight", "DenseReluDense.wo.weight"],
    "mlp": ["net.0.weight", "net.2.weight"],
}

BLOCK_DIAGONAL = {
    "llama": {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "v_proj", "up_proj"]},
    "bert": {"target_modules_bd_a": ["output.dense"], "target_modules_bd_b": ["query", "key", "intermediate.dense"]},
    "t5": {"target_modules_bd_a": [".o", ".wo"], "target_modules_bd_b": [".q", ".v", ".wi"]},
    "mlp": {"target_modules_bd_a": ["net.2"], "target_modules_bd_b": ["net.0"]},
}
"""BD-LoRA's patterns per architecture (substrings of module names): which layers get a block-diagonal A or B."""

FUSED_SLICES = {
    "llama": {"q_proj": [False, True]},
    "gpt2": {"c_attn": [True, False, True]},
    "bert": {"query": [True, False]},
    "t5": {"q": [True, False]},
    "mlp": {"net.0": [False, True]},
}
"""`fused_slices` per architecture: GPT-2's q and v thirds of its fused c_attn, elsewhere a half of one layer."""

CASES = {
    "lora": Case(lambda arch: deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=ARCHS[arch].all_linear)),
    # DoRA starts at the base only to rounding: the bias is taken out of the output and put back.
    "lora-dora": Case(
        lambda arch: deltatune.LoraConfig(r=4, lora_alpha=8, target_modules=ARCHS[arch].all_linear, use_dora=True),
        zero_init=False,
    ),
    # BD-LoRA: block-diagonal B on the layers serving shards by output, A on those it shards by input; other
    # linears (heads) plain. Linear layers only, as in peft (not GPT-2's Conv1D).
    "lora-bdlora": Case(
        lambda arch: deltatune.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=ARCHS[arch].all_linear,
            use_bdlora={**BLOCK_DIAGONAL[arch], "nblocks": 2, "match_strict": False},
        ),
        archs=("llama", "bert", "t5", "mlp"),
    ),
    # LoRA on parts of a layer's output (`fused_slices`), a rank-r pair per part, the other parts left as they are.
    "lora-fused": Case(
        lambda arch: deltatune.LoraConfig(
            r=4, lora_alpha=8, target_modules=list(FUSED_SLICES[arch]), fused_slices=FUSED_SLICES[arch]
        )
    ),
    # AdaLoRA starts at the base (E = 0, peft's init); the budget schedule needs a trainer: test_adalora.py.
    "adalora": Case(
        lambda arch: deltatune.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=ARCHS[arch].all_linear)
    ),
    # LoRA on the linears' weights as bare parameters (`target_parameters`): one tensor per call, so no
    # mixed batches (as in peft).
    "lora-parameters": Case(
        lambda arch: deltatune.LoraConfig(r=4, lora_alpha=8, target_parameters=PARAMETER_TARGETS[arch]),
        mixed_batch=False,
    ),
    # B's bias and every base bias train (as deltas); at init both are zero.
    "lora-bias": Case(
        lambda arch: deltatune.LoraConfig(
            r=4, lora_alpha=8, target_modules=ARCHS[arch].all_linear, lora_bias=True, bias="all"
        )
    ),
    # Rows of many tokens, so that every input row holds some. A tied head recomputes the logits of those
    # tokens, equal to the base's at init only to rounding.
    "lora-tokens": Case(
        lambda arch: deltatune.LoraConfig(
            r=4, lora_alpha=8, target_modules=ARCHS[arch].all_linear, trainable_token_indices=TOKENS
        ),
        archs=("llama", "gpt2", "bert", "t5"),
        zero_init=False,
    ),
    "trainable_tokens": Case(
        lambda arch: deltatune.TrainableTokensConfig(token_indices=TOKENS),
        archs=("llama", "gpt2", "bert", "t5"),
        zero_init=False,
    ),
    # PiSSA and OLoRA start at the base only to rounding: s·B₀A₀ is added and taken out again; the
    # orthogonal init's B A is zero only to rounding. OLoRA runs on nn.Linear only (not GPT-2's Conv1D).
    # r=2: the rank is at most min(out, in) of every layer (BERT's classifier has 3 outputs).
    "lora-pissa": Case(
        lambda arch: deltatune.LoraConfig(r=2, target_modules=ARCHS[arch].all_linear, init_lora_weights="pissa"),
        zero_init=False,
    ),
    "lora-pissa_niter": Case(
        lambda arch: deltatune.LoraConfig(
            r=2, target_modules=ARCHS[arch].all_linear, init_lora_weights="pissa_niter_2"
        ),
        archs=("llama", "mlp"),
        zero_init=False,
    ),
    "lora-olora": Case(
        lambda arch: deltatune.LoraConfig(r=2, target_modules=ARCHS[arch].all_linear, init_lora_weights="olora"),
        archs=("llama", "bert", "t5", "mlp"),
        zero_init=False,
    ),
    "lora-orthogonal": Case(
        lambda arch: deltatune.LoraConfig(r=2, target_modules=ARCHS[arch].all_linear, init_lora_weights="orthogonal"),
        zero_init=False,
    ),
    # KaSA drops W's r smallest singular components from the start (nn.Linear only, as in peft).
    "lora-kasa": Case(
        lambda arch: deltatune.LoraConfig(r=2, target_modules=ARCHS[arch].all_linear, kasa_config={}),
        archs=("llama", "bert", "t5", "mlp"),
        zero_init=False,
    ),
    # MiCA: B frozen at W's minor directions, A = 0 (the only trained factor).
    "lora-mica": Case(
        lambda arch: deltatune.LoraConfig(r=2, target_modules=ARCHS[arch].all_linear, init_lora_weights="mica")
    ),
    # EVA's adapter is a plain LoRA (B = 0) until `initialize_from_data` sets A from data (test_lora_eva.py).
    "lora-eva": Case(
        lambda arch: deltatune.LoraConfig(r=2, target_modules=ARCHS[arch].all_linear, init_lora_weights="eva"),
        archs=("llama", "mlp"),
    ),
    # CorDA's factors are zero until data sets them (test_lora_corda.py): the model starts at the base.
    "lora-corda": Case(
        lambda arch: deltatune.LoraConfig(r=2, target_modules=ARCHS[arch].all_linear, init_lora_weights="corda"),
        archs=("llama", "gpt2", "mlp"),
    ),
    # VeLoRA changes only A's gradient in training (a rank-1 projection of 4 sub-tokens per input row).
    "lora-velora": Case(
        lambda arch: deltatune.LoraConfig(
            r=4, lora_alpha=8, target_modules=ARCHS[arch].all_linear, velora_config={"num_groups": 4}
        )
    ),
    # MonteCLoRA mixes noisy copies of A in training mode only; the table runs in eval mode, where it is plain
    # LoRA with its sampler's priors saved beside A and B (training: test_lora_monteclora.py).
    "lora-monteclora": Case(
        lambda arch: deltatune.LoraConfig(
            r=4, lora_alpha=8, target_modules=ARCHS[arch].all_linear, monteclora_config={"num_samples": 2}
        )
    ),
    # Full fine-tuning trains the base's weights in place; merging is the identity. Mixed batches, disabled() and
    # unload(merge=False) need the base it does not keep, and are refused (tests/test_full.py).
    "full": Case(lambda arch: deltatune.FullConfig(), mixed_batch=False, keeps_model_dtype=True, keeps_base=False),
    "bitfit": Case(lambda arch: deltatune.BitFitConfig(add_missing_bias=True)),
    "vera": Case(lambda arch: deltatune.VeraConfig(r=8, target_modules=ARCHS[arch].all_linear)),
    # peft's default targets per model type; the MLP scales its first layer's output and its second's input.
    "ia3": Case(
        lambda arch: (
            deltatune.IA3Config(target_modules=["net.0", "net.2"], feedforward_modules=["net.2"])
            if arch == "mlp"
            else deltatune.IA3Config()
        )
    ),
    # peft's default norm layers (BERT has none in peft's table: its LayerNorms); the MLP has no norm layer.
    "ln_tuning": Case(
        lambda arch: deltatune.LNTuningConfig(target_modules=["LayerNorm"] if arch == "bert" else None),
        archs=("llama", "gpt2", "bert", "t5"),
        keeps_model_dtype=True,
    ),
    "loha": Case(lambda arch: deltatune.LoHaConfig(r=2, alpha=4, target_modules=ARCHS[arch].all_linear)),
    "lokr": Case(lambda arch: deltatune.LoKrConfig(r=2, alpha=4, target_modules=ARCHS[arch].all_linear)),
    # OFT rotates each adapted layer's input by a block-diagonal orthogonal R (identity at init).
    "oft": Case(lambda arch: deltatune.OFTConfig(oft_block_size=8, target_modules=ARCHS[arch].all_linear)),
    "bottleneck": Case(
        lambda arch: deltatune.BottleneckConfig(preset="houlsby", init_weights="zero_up"),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
    ),
    "compacter": Case(
        lambda arch: deltatune.CompacterConfig(reduction_factor=4, init_weights="zero_up"),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
    ),
    # ReFT edits each row's first and last real positions, found from the attention mask at the model's stack:
    # a plain model (mlp) has neither. Not mergeable (it acts on activations); away from the base at init.
    # BERT's classifier reads the first position only, which the last block's suffix unit never reaches: tied.
    "reft": Case(
        lambda arch: deltatune.LoReftConfig(prefix_positions=2, suffix_positions=2, r=2, tied_weights=arch == "bert"),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
        zero_init=False,
    ),
    "reft-direft": Case(
        lambda arch: deltatune.DiReftConfig(prefix_positions=3, r=2, tied_weights=True, non_linearity="gelu"),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
        zero_init=False,
    ),
    # A fusion needs trained adapters to fuse, so the table cannot attach it alone: its invariants
    # (only fusion weights train, save/load, mixed batches) are in test_adapters.py.
    "fusion": Case(lambda arch: deltatune.FusionConfig(adapters=["a", "b"]), archs=()),
    # Soft prompts start away from the base (a prompt changes the input) and do not merge; plain models
    # (mlp) have no token stack to put a prompt in.
    "prompt_tuning": Case(
        lambda arch: deltatune.PromptTuningConfig(num_virtual_tokens=3),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
        zero_init=False,
    ),
    "p_tuning": Case(
        lambda arch: deltatune.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
        zero_init=False,
    ),
    "prefix_tuning": Case(
        lambda arch: deltatune.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
        zero_init=False,
    ),
    # An encoder-decoder's prefix in AdapterHub's form: joined at every encoder self-, decoder self- and
    # cross-attention module after its cache; no mixed batches.
    "prefix_tuning-joined": Case(
        lambda arch: deltatune.PrefixTuningConfig(
            num_virtual_tokens=3,
            prefix_projection=True,
            encoder_hidden_size=8,
            embedding_dim="hidden_size",
            shift_positions=False,
            encoder_prefix=True,
            cross_prefix=True,
        ),
        archs=("t5",),
        mergeable=False,
        zero_init=False,
        mixed_batch=False,
    ),
    # MAM: prefix tuning + a parallel adapter (AdapterHub's form); on T5 its prefix is joined at the attention
    # modules (`mam-joined`), which rules out mixed batches.
    "mam": Case(
        lambda arch: deltatune.MAMConfig(prefix_tuning={"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
        archs=("llama", "gpt2", "bert"),
        mergeable=False,
        zero_init=False,
    ),
    "mam-joined": Case(
        lambda arch: deltatune.MAMConfig(prefix_tuning={"num_virtual_tokens": 3, "encoder_hidden_size": 8}),
        archs=("t5",),
        mergeable=False,
        zero_init=False,
        mixed_batch=False,
    ),
    # UniPELT: MAM's prefix and a Pfeiffer adapter and LoRA, each gated; the prefix's gate rules out mixed batches.
    "unipelt": Case(
        lambda arch: deltatune.UniPELTConfig(
            prefix_tuning={"num_virtual_tokens": 3, "encoder_hidden_size": 8},
            adapter={"reduction_factor": 4},
            lora={"r": 2},
        ),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
        zero_init=False,
        mixed_batch=False,
    ),
    # The gates alone (UniPELT's `use_gating`): a gated LoRA starts at the base (B = 0) but does not merge.
    "lora-gating": Case(
        lambda arch: deltatune.LoraConfig(r=4, target_modules=ARCHS[arch].all_linear, use_gating=True),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
    ),
    "bottleneck-gating": Case(
        lambda arch: deltatune.BottleneckConfig(preset="pfeiffer", init_weights="zero_up", use_gating=True),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
    ),
    "prefix_tuning-gating": Case(
        lambda arch: deltatune.PrefixTuningConfig(
            num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8, use_gating=True, shared_gating=False
        ),
        archs=("llama", "gpt2", "bert", "t5"),
        mergeable=False,
        zero_init=False,
        mixed_batch=False,
    ),
}


def grid(applies: Callable[[Case], bool] = lambda case: True) -> list:
    return [
        pytest.param(method, arch, id=f"{method}-{arch}")
        for method, case in CASES.items()
        if applies(case)
        for arch in case.archs
    ]


GRID = grid()
KEEPS_BASE = grid(lambda case: case.keeps_base)


def randomize(delta_model: deltatune.DeltaModel, name: str, seed: int = 0) -> None:
    """Give adapter `name` random weights, so its delta is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in delta_model.adapter_parameters(name):
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def attached(method: str, arch: str, name: str = "default", seed: int = 0) -> deltatune.DeltaModel:
    delta_model = deltatune.attach(build(arch), CASES[method].config(arch), name=name)
    randomize(delta_model, name, seed)
    return delta_model


def frozen(arch: str) -> torch.nn.Module:
    """The base model with frozen parameters, as inside a DeltaModel (T5's kernels differ by a few ulp
    depending on whether parameters require grad)."""
    return build(arch).requires_grad_(False)


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors (without deltatune's sites, under every name of a shared module:
    transformers 4's T5 encoder embedding is its `shared`), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "deltatune" not in k.split(".")}


def test_every_builtin_method_has_a_case() -> None:
    builtin = {
        name
        for name in deltatune.registered_methods()
        if type(deltatune.get_method(name)).__module__.startswith("deltatune.")
    }
    assert builtin == {case_name.split("-")[0] for case_name in CASES}


@pytest.mark.parametrize("method,arch", grid(lambda case: case.zero_init))
def test_output_equals_base_at_init(method: str, arch: str) -> None:
    # Under full fine-tuning the base's own parameters train (T5's kernels differ by a few ulp with grads).
    expected = run(frozen(arch) if CASES[method].keeps_base else build(arch), arch)
    delta_model = deltatune.attach(build(arch), CASES[method].config(arch))
    assert torch.equal(run(delta_model, arch), expected)


@pytest.mark.parametrize("method,arch", KEEPS_BASE)
def test_only_adapter_parameters_train_and_base_stays_bit_identical(method: str, arch: str) -> None:
    delta_model = attached(method, arch)
    adapter_ids = {id(p) for p in delta_model.adapter_parameters("default")}
    trainable = [n for n, p in delta_model.named_parameters() if p.requires_grad]
    assert trainable and all(id(dict(delta_model.named_parameters())[n]) in adapter_ids for n in trainable)
    before_state = base_state(delta_model.base_model)
    before_output = run(delta_model, arch).detach()
    optimizer = torch.optim.AdamW([p for p in delta_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = run(delta_model, arch, seed=10 + step).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after_state = base_state(delta_model.base_model)
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert not torch.allclose(run(delta_model, arch), before_output)


@pytest.mark.parametrize("method,arch", GRID)
def test_save_then_load_gives_equal_outputs(method: str, arch: str, tmp_path) -> None:
    delta_model = attached(method, arch)
    delta_model.set_trainable("default", False)  # as loaded (full fine-tuning: T5's kernels differ with grads)
    expected = run(delta_model, arch)
    delta_model.save(tmp_path / "adapter")
    loaded = deltatune.load(build(arch), tmp_path / "adapter")
    assert torch.equal(run(loaded, arch), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("method,arch", grid(lambda case: case.mergeable))
def test_merge_matches_unmerged(method: str, arch: str) -> None:
    delta_model = attached(method, arch)
    expected = run(delta_model, arch)
    delta_model.merge()
    torch.testing.assert_close(run(delta_model, arch), expected, atol=1e-5, rtol=0)
    delta_model.unmerge()
    torch.testing.assert_close(run(delta_model, arch), expected, atol=1e-5, rtol=0)
    merged_plain = delta_model.unload(merge=True)
    torch.testing.assert_close(run(merged_plain, arch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,arch", KEEPS_BASE)
def test_unload_restores_the_base_exactly(method: str, arch: str) -> None:
    reference = build(arch)
    expected, expected_state = run(reference, arch), base_state(reference)
    flags = {n: p.requires_grad for n, p in reference.named_parameters()}
    plain = attached(method, arch).unload(merge=False)
    assert torch.equal(run(plain, arch), expected)
    assert plain.state_dict().keys() == expected_state.keys()
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    assert not [n for n, _ in plain.named_modules() if n.endswith("deltatune")]


@pytest.mark.parametrize("method,arch", KEEPS_BASE)
def test_disabled_equals_base(method: str, arch: str) -> None:
    expected = run(frozen(arch), arch)
    delta_model = attached(method, arch)
    with delta_model.disabled():
        assert torch.equal(run(delta_model, arch), expected)
    assert not torch.equal(run(delta_model, arch), expected)


MIXED_ROW_TOLERANCES = {torch.float32: {"atol": 1e-6, "rtol": 1e-5}, torch.float64: {"atol": 1e-12, "rtol": 0.0}}
"""A sub-batch of one row goes through other matmul blocking than the whole batch: a few float32 ulps of the
value apart (1.07e-6 at a value of 1.07 for T5 on one thread), so relative as well; in float64 ~1e-15."""


@pytest.mark.parametrize("method,arch", grid(lambda case: case.mixed_batch))
def test_mixed_batch_rows_equal_separate_runs(
    method: str, arch: str, skip_layers: tuple[int, ...] = (), dtype: torch.dtype = torch.float32
) -> None:
    delta_model = attached(method, arch, name="a", seed=1)
    delta_model.add("b", CASES[method].config(arch))
    randomize(delta_model, "b", seed=2)
    base = frozen(arch)
    if dtype != torch.float32:  # a quantized base (tests/test_quantized_methods.py) cannot be cast
        delta_model.to(dtype)
        base.to(dtype)
    base_output = run(base, arch)
    delta_model.activate("a", skip_layers=skip_layers)
    output_a = run(delta_model, arch)
    delta_model.activate("b", skip_layers=skip_layers)
    output_b = run(delta_model, arch)
    mixed = run(delta_model, arch, adapter_names=["a", "b", None])
    tolerance = MIXED_ROW_TOLERANCES[dtype]
    torch.testing.assert_close(mixed[0], output_a[0], **tolerance)
    torch.testing.assert_close(mixed[1], output_b[1], **tolerance)
    torch.testing.assert_close(mixed[2], base_output[2], **tolerance)


@pytest.mark.parametrize(
    "method,arch", [param for param in grid(lambda case: case.mixed_batch) if param.values[1] != "mlp"]
)  # the MLP has no blocks to skip
def test_mixed_batch_rows_under_adapterdrop_equal_separate_runs_skipping_the_same_layers(
    method: str, arch: str
) -> None:
    """AdapterDrop skips layer 0's adapters for every row as for the adapter run alone; in float64, where the
    rows must agree to rounding (float32's blocking differs by 1.1e-6 at a value of 0.01 for OLoRA on T5)."""
    test_mixed_batch_rows_equal_separate_runs(method, arch, skip_layers=(0,), dtype=torch.float64)


@pytest.mark.parametrize("method,arch", KEEPS_BASE)
def test_two_active_adapters_add_their_deltas(method: str, arch: str) -> None:
    """For additive methods, running a and b together equals base + Δa + Δb to first order; here we
    check the exact statement that matters: activating both differs from either alone, and
    deactivating one gives the other's output back."""
    delta_model = attached(method, arch, name="a", seed=1)
    delta_model.add("b", copy.deepcopy(CASES[method].config(arch)))
    randomize(delta_model, "b", seed=2)
    delta_model.activate("a")
    output_a = run(delta_model, arch)
    delta_model.activate("a", "b")
    both = run(delta_model, arch)
    assert not torch.allclose(both, output_a)
    delta_model.activate("a")
    assert torch.equal(run(delta_model, arch), output_a)
