"""convattn's attention modules, one file per family. Importing this package registers them."""

from convattn.layers.attn_pool import AttentionPool2d
from convattn.layers.bam import BAM
from convattn.layers.cbam import CBAM, CBAMChannelGate, CBAMSpatialGate
from convattn.layers.channel import ChannelAttention
from convattn.layers.coord import CoordAttention
from convattn.layers.danet import DAChannelAttention, DAPositionAttention
from convattn.layers.eca import ECAModule
from convattn.layers.ema import EMA
from convattn.layers.fca import MultiSpectralAttention
from convattn.layers.gc import GlobalContext
from convattn.layers.gct import GCT
from convattn.layers.ge import GatherExcite
from convattn.layers.nonlocal_ import NonLocalBlock
from convattn.layers.psa import PolarizedSelfAttention
from convattn.layers.scse import ChannelSE, ChannelSpatialSE, SpatialSE
from convattn.layers.se import SEModule
from convattn.layers.sge import SpatialGroupEnhance
from convattn.layers.shuffle import ShuffleAttention
from convattn.layers.simam import SimAM
from convattn.layers.sk import SKConv
from convattn.layers.spatial import SpatialAttention
from convattn.layers.srm import SRM
from convattn.layers.triplet import TripletAttention

__all__ = [
    "BAM",
    "CBAM",
    "EMA",
    "GCT",
    "SRM",
    "AttentionPool2d",
    "CBAMChannelGate",
    "CBAMSpatialGate",
    "ChannelAttention",
    "ChannelSE",
    "ChannelSpatialSE",
    "CoordAttention",
    "DAChannelAttention",
    "DAPositionAttention",
    "ECAModule",
    "GatherExcite",
    "GlobalContext",
    "MultiSpectralAttention",
    "NonLocalBlock",
    "PolarizedSelfAttention",
    "SEModule",
    "SKConv",
    "ShuffleAttention",
    "SimAM",
    "SpatialAttention",
    "SpatialGroupEnhance",
    "SpatialSE",
    "TripletAttention",
]
