"""Built-in methods. Importing this package registers them: each module registers its method on import."""

from . import (
    adalora,
    bitfit,
    bottleneck,
    compacter,
    fusion,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    oft,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    trainable_tokens,
    vera,
)

__all__ = [
    "adalora",
    "bitfit",
    "bottleneck",
    "compacter",
    "fusion",
    "ia3",
    "ln_tuning",
    "loha",
    "lokr",
    "lora",
    "oft",
    "p_tuning",
    "prefix_tuning",
    "prompt_tuning",
    "trainable_tokens",
    "vera",
]
