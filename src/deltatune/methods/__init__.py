"""Built-in methods. Importing this package registers them."""

from . import bitfit, bottleneck, compacter, fusion, ia3, ln_tuning, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (registration happens on import)
