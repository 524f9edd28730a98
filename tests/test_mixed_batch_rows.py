"""Mixed batches: `adapter_names` has exactly one entry per input row, and every row computes what it
computes alone, also through a `modules_to_save` copy of a recurrent layer (tuple outputs)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import deltatune
from test_invariants import randomize
from tiny_models import VOCAB, build


def two_lora_adapters() -> deltatune.DeltaModel:
    delta_model = deltatune.attach(
        build("llama"), deltatune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name="a"
    )
    delta_model.add("b", deltatune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(delta_model, "a", seed=1)
    randomize(delta_model, "b", seed=2)
    return delta_model


def token_ids(rows: int, length: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(rows))


WRONG_LENGTHS = [
    pytest.param(3, ["b"], id="one-name-for-3-rows"),
    pytest.param(9, ["a", "b", None], id="3-names-for-9-rows"),
    pytest.param(9, [None] * 5, id="5-nones-for-9-rows"),
]


@pytest.mark.parametrize("rows,adapter_names", WRONG_LENGTHS)
def test_forward_refuses_adapter_names_without_one_entry_per_row(rows: int, adapter_names: list) -> None:
    delta_model = two_lora_adapters()
    message = f"adapter_names has {len(adapter_names)} entries for a batch of {rows} rows"
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        delta_model(input_ids=token_ids(rows), adapter_names=adapter_names)
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        delta_model(token_ids(rows), adapter_names=adapter_names)
    assert delta_model.routing.row_groups is None


def test_forward_refuses_adapter_names_given_as_a_string() -> None:
    delta_model = two_lora_adapters()
    with pytest.raises(deltatune.DeltaTuneError, match="adapter_names must be a list"):
        delta_model(input_ids=token_ids(3), adapter_names="b")


@pytest.mark.parametrize("rows,adapter_names", WRONG_LENGTHS)
def test_generate_refuses_adapter_names_without_one_entry_per_prompt(rows: int, adapter_names: list) -> None:
    delta_model = two_lora_adapters()
    with pytest.raises(
        deltatune.DeltaTuneError, match=f"adapter_names has {len(adapter_names)} entries for a batch of {rows} rows"
    ):
        delta_model.generate(
            token_ids(rows), max_new_tokens=2, do_sample=False, num_beams=3, adapter_names=adapter_names
        )


def test_beam_search_takes_one_adapter_name_per_prompt() -> None:
    """generate expands each prompt into its beams; the names still count prompts."""
    delta_model = two_lora_adapters()
    prompts = token_ids(3, length=4)
    options = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2}
    separate = []
    for row, name in enumerate(["a", "b", None]):
        delta_model.activate(name or "a")
        with delta_model.disabled() if name is None else contextlib.nullcontext():
            separate.append(delta_model.generate(prompts[row : row + 1], **options))
    mixed = delta_model.generate(prompts, adapter_names=["a", "b", None], **options)
    assert torch.equal(mixed, torch.cat(separate))


class RecurrentTagger(nn.Module):
    """Embedding → recurrent layer → linear head over the outputs and the last hidden state."""

    def __init__(self, cell: type[nn.RNNBase], batch_first: bool, initial_state: bool) -> None:
        super().__init__()
        self.batch_first, self.initial_state = batch_first, initial_state
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = cell(8, 8, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(input_ids)
        sequences = embedded if self.batch_first else embedded.transpose(0, 1)
        start = embedded[:, 0][None].repeat(2, 1, 1)  # (layers, batch, hidden): a different state per row
        hidden = ((start, start.flip(-1)) if isinstance(self.rnn, nn.LSTM) else start) if self.initial_state else None
        outputs, state = self.rnn(sequences, hidden)
        outputs = outputs if self.batch_first else outputs.transpose(0, 1)
        last = (state[0] if isinstance(state, tuple) else state)[-1]
        return self.head(outputs) + self.head(last)[:, None]


@pytest.mark.parametrize(
    "cell,batch_first,initial_state",
    [
        (nn.GRU, True, False),
        (nn.GRU, False, True),
        (nn.LSTM, True, True),
        (nn.LSTM, False, False),
        (nn.RNN, False, False),
    ],
    ids=[
        "gru-batch-first",
        "gru-sequence-first-with-state",
        "lstm-batch-first-with-state",
        "lstm-sequence-first",
        "rnn-sequence-first",
    ],
)
def test_mixed_batch_rows_through_a_recurrent_module_copy_equal_separate_runs(
    cell: type[nn.RNNBase], batch_first: bool, initial_state: bool
) -> None:
    torch.manual_seed(0)
    config = lambda: deltatune.LoraConfig(r=2, target_modules=["head"], modules_to_save=["rnn"])  # noqa: E731
    delta_model = deltatune.attach(RecurrentTagger(cell, batch_first, initial_state).eval(), config(), name="a")
    delta_model.add("b", config())
    randomize(delta_model, "a", seed=1)
    randomize(delta_model, "b", seed=2)
    inputs = token_ids(3)
    separate = {}
    for name in ("a", "b"):
        delta_model.activate(name)
        separate[name] = delta_model(inputs)
    with delta_model.disabled():
        separate[None] = delta_model(inputs)
    mixed = delta_model(inputs, adapter_names=["a", "b", None])
    for row, name in enumerate(["a", "b", None]):
        torch.testing.assert_close(mixed[row], separate[name][row], atol=1e-6, rtol=0)
    mixed.sum().backward()  # training through the copy's rows
    assert all(parameter.grad is not None for parameter in delta_model.adapter_parameters("b"))


class PairOutput(nn.Module):
    """A module whose output is a tuple that is not a recurrent layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x


class PairModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = PairOutput()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pair(x)[0])


def test_mixed_batch_refuses_a_module_copy_with_an_unknown_tuple_output() -> None:
    config = lambda: deltatune.LoraConfig(r=2, target_modules=["head"], modules_to_save=["pair"])  # noqa: E731
    delta_model = deltatune.attach(PairModel(), config(), name="a")
    delta_model.add("b", config())
    with pytest.raises(deltatune.DeltaTuneError, match="returns a tuple.*run each adapter in its own batch"):
        delta_model(torch.randn(3, 16), adapter_names=["a", "b", None])
