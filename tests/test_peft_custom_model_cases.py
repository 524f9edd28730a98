"""peft's own LoRA test table (`tests/test_custom_models.py`, its `TEST_CASES`), run through peft and deltatune.

Every LoRA case of that table has a row here under its name, with its model (our own small modules, built
with the same layer names and shapes) and its config keywords. Each row builds the adapter with random,
non-zero A and B (`init_lora_weights=False`; DoRA magnitudes perturbed away from their starting norm, MiCA's
zero A drawn) on
one side, moves it to the other through a peft folder, and checks:

- peft's folder loads here with peft's outputs, and ours loads in peft with ours (atol 1e-5);
- merged equals unmerged, in both libraries, and unmerge restores the base; where peft refuses to merge
  (grouped convolutions) deltatune refuses too.

Every case runs: MonteCLoRA, the last of peft's LoRA variants to land, compares in eval mode, where it is
plain LoRA (its training-mode noise and regulariser are cross-checked in test_lora_monteclora.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.errors import MergeError
from test_peft_crosscheck import assert_changed, assert_same, perturb_our_saved_modules, perturb_peft_saved_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- the table's models
class MLP(nn.Module):
    """ "MLP": Linear 10 → 20, ReLU, Linear 20 → 2, log-softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.relu(self.lin0(x))), dim=-1)


class EmbConv1D(nn.Module):
    """ "EmbConv1D": Embedding(100, 5), GPT-2's Conv1D 5 → 1, then Linear over the flattened sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(ids))).flatten(1)), dim=-1)


class ConvThenLinear(nn.Module):
    """ "Conv1d", "Conv2d", "Conv2dGroups2", "Conv3d": one convolution named after its kind, ReLU, a Linear
    head over the flattened maps; `shape` is the shape of one input row."""

    def __init__(self, name: str, conv: nn.Module, head_features: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_name = name
        self.add_module(name, conv)
        self.lin0 = nn.Linear(head_features, 2)
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(getattr(self, self.conv_name)(x.reshape(-1, *self.shape)))
        return torch.log_softmax(self.lin0(maps.flatten(1)), dim=-1)


class Conv2dGroups(nn.Module):
    """ "Conv2dGroups": Linear 90 → 288 over the whole batch, reshaped to 2 × 16 × 3 × 3, a Conv2d 16 → 16
    with kernel 3 and 8 groups (r = 8 is divisible by them), Linear 16 → 2."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.conv2d(self.lin0(x.flatten()).reshape(2, 16, 3, 3)))
        return torch.log_softmax(self.lin1(maps.flatten(1)), dim=-1)


class MHA(nn.Module):
    """ "MHA": nn.MultiheadAttention(10, 2) as self-attention, Linear 10 → 2."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.mha(x, x, x)
        return torch.log_softmax(self.lin0(attended), dim=-1)


class LinearUsingParameter(nn.Module):
    """A linear layer written as `x @ weight + bias` over bare parameters (weight in × out)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    """ "MlpUsingParameters": the MLP with its linears as `LinearUsingParameter`s."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = LinearUsingParameter(10, 20)
        self.lin1 = LinearUsingParameter(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


def _rows(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda generator: torch.randn(*shape, generator=generator)


@dataclass(frozen=True)
class Model:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]


MODELS = {
    "MLP": Model(MLP, _rows(9, 10)),
    "EmbConv1D": Model(EmbConv1D, lambda generator: torch.randint(0, 100, (9, 10), generator=generator)),
    "Conv1d": Model(lambda: ConvThenLinear("conv1d", nn.Conv1d(1, 1, 2), 9, (1, 10)), _rows(9, 10)),
    "Conv2d": Model(lambda: ConvThenLinear("conv2d", nn.Conv2d(5, 10, 3), 10, (5, 3, 3)), _rows(9, 45)),
    "Conv2dGroups": Model(Conv2dGroups, _rows(9, 10)),
    "Conv2dGroups2": Model(
        lambda: ConvThenLinear("conv2d", nn.Conv2d(16, 32, 3, padding=1, groups=2), 12800, (16, 20, 20)),
        _rows(3, 16, 20, 20),
    ),
    "Conv3d": Model(lambda: ConvThenLinear("conv3d", nn.Conv3d(5, 10, 3), 10, (5, 3, 3, 3)), _rows(9, 135)),
    "MHA": Model(MHA, _rows(9, 10)),
    "MlpUsingParameters": Model(MlpUsingParameters, _rows(9, 10)),
}


# ----------------------------------------------------------------------------- the table's LoRA cases
@dataclass(frozen=True)
class Row:
    model: str
    options: dict[str, Any]


def _velora(init_type: str) -> dict[str, Any]:
    """peft's VeLoRA keywords as both libraries read them (a mapping becomes each one's VeloraConfig)."""
    return {"velora_config": {"num_groups": 2, "init_type": init_type}}


CASES: dict[str, Row] = {
    "Vanilla MLP 1 LoRA": Row("MLP", {"target_modules": "lin0"}),
    "Vanilla MLP 2 LoRA": Row("MLP", {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 LoRA": Row("MLP", {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 LoRA": Row("MLP", {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 LoRA": Row("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "Vanilla MLP 6 LoRA": Row("MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    "Vanilla MLP 7 LoRA with DoRA": Row("MLP", {"target_modules": ["lin0"], "use_dora": True}),
    "Vanilla MLP 8 LoRA with DoRA": Row("MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    "Vanilla MLP 1 LoRA with KaSA": Row("MLP", {"target_modules": ["lin0"], "r": 4, "kasa_config": {}}),
    "Vanilla MLP 1 LoRA with MiCA": Row("MLP", {"target_modules": ["lin0"], "r": 4, "init_lora_weights": "mica"}),
    "Vanilla MLP 9 LoRA with DoRA": Row("MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    "Vanilla MLP 10 LoRA with VeLoRA random": Row("MLP", {"target_modules": ["lin0"], **_velora("random")}),
    "Vanilla MLP 11 LoRA with VeLoRA batch_average": Row(
        "MLP", {"target_modules": ["lin0", "lin1"], **_velora("batch_average")}
    ),
    "Vanilla MLP 12 LoRA with VeLoRA batch_average_once": Row(
        "MLP", {"target_modules": ["lin0"], **_velora("batch_average_once")}
    ),
    "Embedding + transformers Conv1D 1 LoRA": Row("EmbConv1D", {"target_modules": ["conv1d"]}),
    "Embedding + transformers Conv1D 2 LoRA": Row("EmbConv1D", {"target_modules": ["emb"]}),
    "Embedding + transformers Conv1D 3 LoRA": Row("EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    "Embedding + transformers Conv1D 1 DoRA": Row("EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    "Embedding + transformers Conv1D 2 DoRA": Row("EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    "Embedding + transformers Conv1D 3 DoRA": Row("EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    "Embedding + transformers Conv1D 1 LoRA trainable_tokens": Row(
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    "Conv1d LoRA": Row("Conv1d", {"target_modules": ["conv1d"]}),
    "Conv1d LoRA with DoRA": Row("Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    "Conv2d 1 LoRA": Row("Conv2d", {"target_modules": ["conv2d"]}),
    "Conv2d 2 LoRA": Row("Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    "Conv2d 1 LoRA with DoRA": Row("Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    "Conv2d 2 LoRA with DoRA": Row("Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    "Conv2d Groups LoRA": Row("Conv2dGroups", {"target_modules": ["conv2d"]}),
    "Conv2d Groups2 LoRA": Row("Conv2dGroups2", {"target_modules": ["conv2d"]}),
    "Conv2d Groups LoRA with DoRA": Row("Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    "Conv2d Groups2 LoRA with DoRA": Row("Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
    "Conv3d 1 LoRA": Row("Conv3d", {"target_modules": ["conv3d"]}),
    "Conv3d 2 LoRA": Row("Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    "Conv3d 1 LoRA with DoRA": Row("Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    "Conv3d 2 LoRA with DoRA": Row("Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    "Vanilla MLP 1 LoRA with lora_b bias": Row(
        "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}
    ),
    "Conv2d 1 LoRA with lora_b bias": Row(
        "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}
    ),
    "Conv3d 1 LoRA with lora_b bias": Row(
        "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}
    ),
    "MHA 1 LoRA": Row("MHA", {"target_modules": ["mha"]}),
    "MHA 2 LoRA": Row("MHA", {"target_modules": ["mha", "lin0"]}),
    "MLP 1 using nn.Parameter LoRA": Row("MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    "MLP 2 using nn.Parameter LoRA": Row("MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    "Vanilla MLP 1 LoRA with Monteclora": Row(
        "MLP", {"target_modules": ["lin0"], "monteclora_config": {"num_samples": 2}}
    ),
    "BD-LoRA A only": Row(
        "MLP",
        {"target_modules": ["lin0", "lin1"], "use_bdlora": {"target_modules_bd_a": ["lin0"], "match_strict": False}},
    ),
    "BD-LoRA B only": Row(
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"target_modules_bd_b": ["lin1"], "nblocks": 2, "match_strict": False},
        },
    ),
    "BD-LoRA both A and B": Row(
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2},
        },
    ),
}


def cases() -> list:
    """The rows as parameters, each named after peft's case."""
    return [pytest.param(name, id=name) for name in CASES]


# ----------------------------------------------------------------------------- helpers
def base_model(row: Row) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[row.model].build().eval()


def inputs(row: Row) -> torch.Tensor:
    return MODELS[row.model].inputs(torch.Generator().manual_seed(1))


def perturb_magnitudes(model: nn.Module) -> None:
    """DoRA's m × (1 + 0.3 · noise), so that it differs from the norm it starts at; a trained A that starts
    at zero whatever `init_lora_weights=False` says (MiCA's) drawn N(0, 1), so that the adapter acts."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.randn_like(parameter))
            elif "lora_A" in name and parameter.requires_grad and not parameter.any():
                parameter.normal_()


def options_of(row: Row) -> dict[str, Any]:
    """The row's config keywords for either library, with random A and B."""
    return {"init_lora_weights": False, **copy.deepcopy(row.options)}


def peft_model(row: Row, base: nn.Module) -> peft.PeftModel:
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options_of(row)))
    perturb_magnitudes(model)
    perturb_peft_saved_modules(model)
    return model.eval()


def our_model(row: Row, base: nn.Module) -> deltatune.DeltaModel:
    model = deltatune.attach(copy.deepcopy(base), deltatune.LoraConfig(**options_of(row)))
    perturb_magnitudes(model)
    perturb_our_saved_modules(model)
    return model.eval()


def grouped(row: Row) -> bool:
    return row.model in ("Conv2dGroups", "Conv2dGroups2")


# ----------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("name", cases())
def test_peft_folder_of_the_case_loads_here_with_peft_outputs(name: str, tmp_path: Path) -> None:
    row = CASES[name]
    base, x = base_model(row), inputs(row)
    theirs = peft_model(row, base)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        expected = theirs(x)
        assert_changed(expected, base(x))
        assert_same(ours(x), expected)


@pytest.mark.parametrize("name", cases())
def test_our_folder_of_the_case_loads_in_peft_with_our_outputs(name: str, tmp_path: Path) -> None:
    row = CASES[name]
    base, x = base_model(row), inputs(row)
    ours = our_model(row, base)
    ours.save(str(tmp_path), format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        expected = ours(x)
        assert_changed(expected, base(x))
        assert_same(theirs(x), expected)


@pytest.mark.parametrize("name", cases())
def test_merged_case_equals_unmerged_in_both_libraries_and_unmerge_restores_the_base(name: str, tmp_path: Path) -> None:
    row = CASES[name]
    base, x = base_model(row), inputs(row)
    theirs = peft_model(row, base)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.load(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        unmerged = ours(x)
        if grouped(row):  # peft refuses these merges, and so do we
            with pytest.raises(NotImplementedError):
                theirs.merge_adapter()
            with pytest.raises(MergeError, match="grouped convolution"):
                ours.merge()
            assert_same(ours(x), unmerged)
            return
        ours.merge()
        theirs.merge_adapter()
        assert_same(ours(x), unmerged)
        assert_same(theirs(x), unmerged)
        ours.unmerge()
        theirs.unmerge_adapter()
        assert_same(ours(x), unmerged)
        with ours.disabled():
            assert_same(ours(x), base(x))
