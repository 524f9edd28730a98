"""Built-in methods. Importing this package registers them."""

from . import bitfit, bottleneck, compacter, fusion, loha, lokr, lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401  (registration happens on import)  # noqa: F401  # noqa: F401
