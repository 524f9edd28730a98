"""The site map (`deltatune.architectures`): checked numerically on every listed architecture, the
search fallback on a model defined here, and the error and override for a model it cannot read."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import deltatune
from deltatune.architectures import ARCHITECTURES, sublayer_sites
from tiny_models import VOCAB

SMALL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **SMALL
    ),
    "roberta": lambda: transformers.RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        **SMALL,
    ),
    "distilbert": lambda: transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB, pad_token_id=0
    ),
    "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, **SMALL),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **SMALL
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **SMALL
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **SMALL
    ),
    "t5": lambda: transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0
    ),
    "bart": lambda: transformers.BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=40,
        **SMALL,
    ),
}
INPUTS = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def tiny(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(TINY_CONFIGS[model_type]()).eval()


def call(model: nn.Module) -> None:
    decoder = {"decoder_input_ids": INPUTS[:, :4]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        model(input_ids=INPUTS, **decoder)


def test_the_map_lists_the_architectures_the_issue_names() -> None:
    assert set(TINY_CONFIGS) <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_site_map_matches_the_residual_stream(model_type: str) -> None:
    """With x recorded at each sublayer's input module and h at its output module: post-LN blocks
    normalise exactly h + x; pre-LN blocks pass x + h on (to the FFN, and out of the block)."""
    model = tiny(model_type)
    sites = sublayer_sites(model)
    assert len({site.layer for site in sites}) == len(sites) // 2 == (4 if model.config.is_encoder_decoder else 2)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:
        handles.append(
            model.get_submodule(site.input).register_forward_pre_hook(
                lambda m, args, kwargs, key=site.input, arg=site.input_argument: seen.__setitem__(
                    key, args[0] if args else kwargs[arg]
                ),
                with_kwargs=True,
            )
        )
        handles.append(
            model.get_submodule(site.output).register_forward_hook(
                lambda m, args, out, key=site.output: seen.__setitem__(key, out)
            )
        )
        if site.layer_norm:
            handles.append(
                model.get_submodule(site.layer_norm).register_forward_pre_hook(
                    lambda m, args, key=site.layer_norm: seen.__setitem__(key, args[0])
                )
            )
        handles.append(
            model.get_submodule(site.block).register_forward_hook(
                lambda m, args, out, key=site.block: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)
            )
        )
    call(model)
    for handle in handles:
        handle.remove()
    for attention, ffn in zip(sites[::2], sites[1::2]):
        assert (attention.kind, ffn.kind, attention.block) == ("attention", "ffn", ffn.block)
        for site in (attention, ffn):
            if site.layer_norm:
                torch.testing.assert_close(
                    seen[site.layer_norm], seen[site.output] + seen[site.input], atol=1e-6, rtol=0
                )
        if not attention.layer_norm:
            torch.testing.assert_close(seen[ffn.block], seen[ffn.input] + seen[ffn.output], atol=1e-6, rtol=0)
            if "decoder" not in attention.block:  # decoder blocks add cross-attention in between
                torch.testing.assert_close(
                    seen[ffn.input], seen[attention.input] + seen[attention.output], atol=1e-6, rtol=0
                )


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("model_type", ["roberta", "distilbert", "mistral", "qwen2", "bart"])
def test_adapters_run_on_every_listed_architecture(model_type: str, preset: str) -> None:
    model = tiny(model_type)
    delta_model = deltatune.attach(model, deltatune.BottleneckConfig(preset=preset, init_weights="bert"))
    expected_sites = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[preset] * (
        4 if model.config.is_encoder_decoder else 2
    )
    assert len(delta_model.targets["default"]) == expected_sites
    call(delta_model)


class TinyAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4.0, dim=-1).tril()
        return self.o(weights @ self.v(x))


class TinyMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = (
            nn.Linear(width, 2 * width),
            nn.Linear(width, 2 * width),
            nn.Linear(2 * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class TinyBlock(nn.Module):
    """A pre-LN Llama-like block, written here (not from transformers)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.attention_norm, self.attn = nn.LayerNorm(width), TinyAttention(width)
        self.mlp_norm, self.mlp = nn.LayerNorm(width), TinyMLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(TinyBlock() for _ in range(3))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def test_the_fallback_finds_blocks_of_a_model_it_never_saw(tmp_path) -> None:
    torch.manual_seed(0)
    sites = sublayer_sites(TinyLM())
    assert [(site.kind, site.output, site.input) for site in sites[:2]] == [
        ("attention", "layers.0.attn.o", "layers.0.attn"),
        ("ffn", "layers.0.mlp.down", "layers.0.mlp"),
    ]
    assert len(sites) == 6
    base = TinyLM().eval()
    expected = base(INPUTS)
    delta_model = deltatune.attach(base, deltatune.BottleneckConfig(init_weights="zero_up"))
    assert torch.equal(delta_model(INPUTS), expected)
    optimizer = torch.optim.SGD([p for p in delta_model.parameters() if p.requires_grad], lr=0.1)
    delta_model(INPUTS).pow(2).mean().backward()
    optimizer.step()
    trained = delta_model(INPUTS)
    assert not torch.allclose(trained, expected)
    delta_model.save(tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = TinyLM().eval()
    fresh.load_state_dict(base.state_dict(), strict=False)
    assert torch.equal(deltatune.load(fresh, tmp_path / "adapter")(INPUTS), trained)


def test_parallel_adapters_read_the_sublayer_input_through_the_fallback() -> None:
    torch.manual_seed(0)
    delta_model = deltatune.attach(TinyLM().eval(), deltatune.BottleneckConfig(preset="parallel", init_weights="bert"))
    seen, read = [], []
    block = delta_model.base_model.layers[1]
    adapter = block.mlp.down.deltatune.adapters["default"]
    handles = [
        block.mlp.register_forward_pre_hook(lambda module, args: seen.append(args)),
        block.mlp.down.register_forward_hook(lambda module, args, output: read.append(adapter.tap.value), prepend=True),
    ]
    output = delta_model(INPUTS)
    for handle in handles:
        handle.remove()
    assert torch.equal(read[0], seen[0][0]) and output.isfinite().all()
    assert adapter.tap.value is None  # forgotten once the call is done


class Mixer(nn.Module):
    """Blocks whose names the search does not know: `stages`, with `mixer` and `channel` children."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.ModuleDict(
                {
                    "mixer": nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)),
                    "channel": nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
                }
            )
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = x + stage["mixer"](x)
            x = x + stage["channel"](x)
        return x


def test_a_model_without_discoverable_blocks_raises_an_error_naming_the_config_fields() -> None:
    with pytest.raises(
        deltatune.DeltaTuneError, match=r"architecture=.*\"blocks\".*\"attention_output\".*\"ffn_output\""
    ) as error:
        deltatune.attach(Mixer(), deltatune.BottleneckConfig())
    assert "Mixer" in str(error.value)


def test_the_config_override_places_adapters_where_the_search_cannot() -> None:
    torch.manual_seed(0)
    model = Mixer().eval()
    x = torch.randn(3, 8)
    expected = model(x)
    override = {
        "blocks": "stages",
        "attention_output": "mixer.2",
        "ffn_output": "channel.2",
        "attention_input": "mixer",
        "ffn_input": "channel",
    }
    delta_model = deltatune.attach(
        model, deltatune.BottleneckConfig(preset="parallel", architecture=override, bottleneck_size=4)
    )
    assert delta_model.targets["default"] == ["stages.0.channel.2", "stages.1.channel.2"]
    assert torch.equal(delta_model(x), expected)
    delta_model.activate("default", skip_layers=[0])
    with pytest.raises(deltatune.DeltaTuneError, match="unknown keys"):
        deltatune.BottleneckConfig(architecture={**override, "attn": "mixer.0"})
