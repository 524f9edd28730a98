"""Built-in methods. Importing this package registers them."""

from . import adalora, bitfit, bottleneck, compacter, fusion, lora, p_tuning, prefix_tuning, prompt_tuning, vera  # noqa: F401  (registration happens on import)
