"""convattn: channel and spatial attention for convolutional networks.

>>> import convattn
>>> se = convattn.create("se", 256)            # paper defaults
>>> convattn.list_attention(kind="spatial")    # registered keys
>>> convattn.info("eca").defaults              # paper, link, placement, defaults, differences
"""

from convattn import layers
from convattn.registry import AttentionSpec, create, info, list_attention, register

__version__ = "0.1.0"

__all__ = ["AttentionSpec", "__version__", "create", "info", "layers", "list_attention", "register"]
