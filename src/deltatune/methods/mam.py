"""MAM: the mix-and-match adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", arXiv:2110.04366), composed as AdapterHub's `MAMConfig` composes it: prefix tuning on every
self-attention layer and a parallel bottleneck adapter on every feed-forward sublayer, one adapter name.

    K_l ← [P^K_l ; K_l],  V_l ← [P^V_l ; V_l]         P = W₂ tanh(W₁ E + b₁) + b₂, n = 30, W₁: d → 800
    h ← h + 4 · (W_up relu(W_down x + b_down) + b_up)   x: the FFN's input, size = hidden / 2, W_up = 0 at init

(d = the model's hidden size, and real tokens keep their positions behind the prefix: AdapterHub's
prefix form.) MAM is data over the two methods, not a copy of them: its config holds a
`PrefixTuningConfig` and a `BottleneckConfig`, and `attach` runs both methods' own attach on the one
placement, so every module of the adapter is theirs (and so are saving, mixed batches and dtype rules).
Not mergeable (the prefix and f are not linear in the weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import DeltaConfig
from ..errors import DeltaTuneError
from ..placement import Placement
from ..registry import register
from .bottleneck import Bottleneck, BottleneckConfig
from .prefix_tuning import PrefixTuning, PrefixTuningConfig

PREFIX_DEFAULTS: dict[str, Any] = dict(
    num_virtual_tokens=30,
    prefix_projection=True,
    encoder_hidden_size=800,
    embedding_dim="hidden_size",
    shift_positions=False,
    encoder_prefix=True,
    cross_prefix=True,
)
"""AdapterHub's MAM prefix: `PrefixTuningConfig(bottleneck_size=800)` with its prefix_length 30."""
ADAPTER_DEFAULTS: dict[str, Any] = dict(preset="parallel")
"""AdapterHub's MAM adapter: `ParBnConfig()` (reduction 2, scaling 4, relu, W_up zero)."""


def part_config(
    value: DeltaConfig | dict[str, Any] | None, config_class: type[DeltaConfig], defaults: dict[str, Any], field: str
) -> DeltaConfig:
    """A part of a composed config: a config as given, or a dict of changes to the composition's defaults."""
    if isinstance(value, config_class):
        part = value
    elif value is None or isinstance(value, dict):
        changes = {key: item for key, item in (value or {}).items() if key != "method"}
        try:
            part = config_class.from_dict({**defaults, **changes})
        except DeltaTuneError as error:
            raise DeltaTuneError(f"{field}: {error}") from None
    else:
        raise DeltaTuneError(f"{field} must be a {config_class.__name__} or a dict of its fields, got {value!r}")
    if part.modules_to_save:
        raise DeltaTuneError(f"set modules_to_save on the composed config, not on its {field} part")
    return part


@dataclasses.dataclass
class MAMConfig(DeltaConfig):
    """Prefix tuning + a parallel adapter. A part given as a dict changes AdapterHub's MAM defaults; a part
    given as a config is taken as it is."""

    prefix_tuning: PrefixTuningConfig | dict[str, Any] | None = None
    """The prefix part; None: 30 virtual tokens through an MLP of hidden size 800 on the model's hidden
    size, real positions kept (AdapterHub's MAM prefix)."""
    adapter: BottleneckConfig | dict[str, Any] | None = None
    """The adapter part; None: the "parallel" preset (AdapterHub's `par_bn`)."""

    def normalise(self) -> None:
        self.prefix_tuning = part_config(self.prefix_tuning, PrefixTuningConfig, PREFIX_DEFAULTS, "prefix_tuning")
        self.adapter = part_config(self.adapter, BottleneckConfig, ADAPTER_DEFAULTS, "adapter")
        super().normalise()


@register("mam")
class MAM:
    """Prefix tuning's and the bottleneck adapter's own attach, on one placement."""

    config_class = MAMConfig

    def attach(self, placement: Placement, config: MAMConfig) -> None:
        PrefixTuning().attach(placement, config.prefix_tuning)
        Bottleneck().attach(placement, config.adapter)
