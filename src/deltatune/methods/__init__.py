"""Built-in methods. Importing this package registers them."""

from . import bitfit, lora  # noqa: F401  (registration happens on import)
from . import bottleneck, compacter, fusion  # noqa: F401
from . import p_tuning, prefix_tuning, prompt_tuning  # noqa: F401
