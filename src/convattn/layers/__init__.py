"""convattn's attention modules, one file per family. Importing this package registers them."""

from convattn.layers.cbam import CBAM, CBAMChannelGate, CBAMSpatialGate
from convattn.layers.channel import ChannelAttention
from convattn.layers.coord import CoordAttention
from convattn.layers.eca import ECAModule
from convattn.layers.scse import ChannelSE, ChannelSpatialSE, SpatialSE
from convattn.layers.se import SEModule
from convattn.layers.sk import SKConv
from convattn.layers.spatial import SpatialAttention

__all__ = [
    "CBAM",
    "CBAMChannelGate",
    "CBAMSpatialGate",
    "ChannelAttention",
    "ChannelSE",
    "ChannelSpatialSE",
    "CoordAttention",
    "ECAModule",
    "SEModule",
    "SKConv",
    "SpatialAttention",
    "SpatialSE",
]
