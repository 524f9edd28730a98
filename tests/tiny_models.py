"""Tiny models built from configs (no downloads), with matching inputs, for every test."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96
BATCH = 3
LENGTH = 7


class MLP(nn.Module):
    """A plain PyTorch model: no transformers, no config."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def llama(hidden_size: int = 32) -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


@functools.cache
def _saved_llama_64() -> str:
    """A 64-wide tiny Llama saved once per session (bitsandbytes quantizes in blocks of 64)."""
    folder = tempfile.mkdtemp(prefix="deltatune-llama-64-")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        llama(hidden_size=64).save_pretrained(folder)
    return folder


def llama_nf4() -> nn.Module:
    """The 64-wide tiny Llama loaded with bitsandbytes nf4 linear layers (double quantization, float32
    compute), prepared as the trainer prepares a quantized base (`deltatune.prepare_quantized_base`:
    among others, the 4-bit layers keep bitsandbytes' portable layout, so that its `state_dict()` is a
    read and not an unpacking of a layer bitsandbytes repacked for inference)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import deltatune

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with torch.random.fork_rng():
        model = AutoModelForCausalLM.from_pretrained(
            _saved_llama_64(), dtype=torch.float32, quantization_config=quantization, device_map="cpu"
        )
    deltatune.prepare_quantized_base(model)
    return model


def gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def t5() -> nn.Module:
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def mlp() -> nn.Module:
    return MLP()


@dataclass(frozen=True)
class Arch:
    """A tiny model, its inputs, and how to read one tensor out of its output."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    read: Callable[[object], torch.Tensor]
    all_linear: list[str] | str


def token_inputs(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)}


def seq2seq_inputs(seed: int) -> dict[str, torch.Tensor]:
    inputs = token_inputs(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 5), generator=generator)
    return inputs


def mlp_inputs(seed: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(seed))}


def logits(output: object) -> torch.Tensor:
    return output.logits


ARCHS = {
    "llama": Arch("llama", llama, token_inputs, logits, "all-linear"),
    "gpt2": Arch("gpt2", gpt2, token_inputs, logits, "all-linear"),
    "bert": Arch("bert", bert, token_inputs, logits, "all-linear"),
    "t5": Arch("t5", t5, seq2seq_inputs, logits, "all-linear"),
    "mlp": Arch("mlp", mlp, mlp_inputs, lambda output: output, ["net.0", "net.2"]),
    "llama-nf4": Arch("llama-nf4", llama_nf4, token_inputs, logits, "all-linear"),
}
"""`llama-nf4` needs bitsandbytes (`QUANTIZED_ARCHS`); the others need only transformers."""
QUANTIZED_ARCHS = {"llama-nf4": "bitsandbytes"}


def build(name: str, seed: int = 0) -> nn.Module:
    """The tiny model `name`, deterministic, in eval mode."""
    torch.manual_seed(seed)
    return ARCHS[name].build().eval()


def run(model: nn.Module, arch: str, seed: int = 1, **kwargs) -> torch.Tensor:
    """The model's main output tensor on the arch's fixed inputs."""
    return ARCHS[arch].read(model(**ARCHS[arch].inputs(seed), **kwargs))
