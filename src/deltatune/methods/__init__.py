"""Built-in methods. Importing this package registers them."""

from . import bitfit, bottleneck, compacter, fusion, lora, p_tuning, prefix_tuning, prompt_tuning, trainable_tokens  # noqa: F401  (registration happens on import)  # noqa: F401  # noqa: F401
