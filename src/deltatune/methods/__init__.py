"""Built-in methods. Importing this package registers them."""

from . import bitfit, lora  # noqa: F401  (registration happens on import)
