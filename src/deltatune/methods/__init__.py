"""Built-in methods. Importing this package registers them."""

from . import bitfit, bottleneck, compacter, fusion, lora, oft, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (registration happens on import)
