"""convattn: channel and spatial attention for convolutional networks.

>>> import convattn
>>> se = convattn.create("se", 256)            # paper defaults
>>> convattn.list_attention(kind="spatial")    # registered keys
>>> convattn.info("eca").defaults              # paper, link, placement, defaults, differences
>>> net = convattn.models.resnet50(attention="cbam")        # reference backbone, paper placement
>>> report = convattn.attach(torchvision_model, "eca")     # into an existing (pretrained) model
"""

from convattn import layers, models
from convattn.fast import optimize
from convattn.placement import PLACEMENTS, paper_placement
from convattn.registry import AttentionSpec, create, info, list_attention, register
from convattn.surgery import AttachReport, IdentityStart, attach, detach
from convattn.viz import AttentionMaps, CapturedMap, capture

__version__ = "0.1.0"

__all__ = [
    "PLACEMENTS",
    "AttachReport",
    "AttentionMaps",
    "AttentionSpec",
    "CapturedMap",
    "IdentityStart",
    "__version__",
    "attach",
    "capture",
    "create",
    "detach",
    "info",
    "layers",
    "list_attention",
    "models",
    "optimize",
    "paper_placement",
    "register",
]
