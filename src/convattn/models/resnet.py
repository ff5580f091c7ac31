"""Reference ResNets with attention where each paper put it.

- ImageNet ResNet-18/34/50/101/152 and ResNeXt-50 (32x4d) (He et al., 2016, arXiv 1512.03385;
  Xie et al., 2017, arXiv 1611.05431). Module names and parameter counts equal torchvision's,
  so torchvision's weights load into the plain networks and, with ``strict=False``, into the
  attention variants (only the attention keys are new).
- CIFAR ResNet-20/32/44/56/110: three stages of basic blocks, widths 16-32-64, 3x3 stem (He et
  al., section 4.2), with the paper's parameter-free shortcut (option A) by default.

``attention`` is a registry key (or a module class) and goes where its paper placed it
(``convattn.placement``): after the last BN for SE, ECA, CBAM, GC, SRM, GE, FcaNet, Triplet...;
after the 3x3 conv for SimAM; before every conv for GCT; after stages 1-3 for BAM; SK replaces
the 3x3 grouped conv (SKNet-50 is ``resnext50_32x4d(attention="sk")``). ``placement=`` overrides it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from convattn.models._attention import AttentionArg, AttentionFactory, backbone_modules

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
]

_BLOCK_PLACEMENTS = ("block_end", "after_conv2", "before_conv", "replace_conv2")
_NET_PLACEMENTS = ("stage_end", "every_other_block", "head", "pool")
# Per-stage options of the released ImageNet models: ECA passes k = 3, 5, 5, 7 instead of the
# adaptive formula; FcaNet sizes its DCT grid, and GE-theta its map-sized depthwise kernel, to
# each stage's map (56, 28, 14, 7 at 224 px).
_STAGE_OPTIONS: dict[str, tuple[str, tuple[int, ...]]] = {
    "eca": ("kernel_size", (3, 5, 5, 7)),
    "fca": ("dct_size", (56, 28, 14, 7)),
    "ge": ("feat_size", (56, 28, 14, 7)),
    "ge_plus": ("feat_size", (56, 28, 14, 7)),
}


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _Block(nn.Module):
    """Shared forward of the two residual blocks, with the attention slots.

    Slots that are not used are ``nn.Identity`` (no parameters, no state-dict keys):
    ``pre_conv1/2/3`` and ``pre_downsample`` (before_conv), ``attn_conv2`` (after_conv2),
    ``attn`` (block_end). With replace_conv2, ``conv2`` is the attention convolution and
    ``bn2`` is an identity (the SK convolution normalises its own branches).
    """

    if TYPE_CHECKING:  # for type checkers only: TorchScript cannot read these annotations
        conv1: nn.Module
        bn1: nn.Module
        conv2: nn.Module
        bn2: nn.Module
        conv3: nn.Module | None
        bn3: nn.Module | None
        relu: nn.Module
        pre_conv1: nn.Module
        pre_conv2: nn.Module
        pre_conv3: nn.Module
        pre_downsample: nn.Module
        attn_conv2: nn.Module
        attn: nn.Module
        downsample: nn.Module | None

    @torch.jit.unused
    def _fast_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused forward of ``convattn.fast`` (eager mode only), or None."""
        from convattn.fast import block_forward

        return block_forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast = self._fast_forward(x)
            if fast is not None:
                return fast
        identity = x
        out = self.relu(self.bn1(self.conv1(self.pre_conv1(x))))
        out = self.attn_conv2(self.conv2(self.pre_conv2(out)))
        out = self.bn2(out)
        if self.conv3 is not None and self.bn3 is not None:
            out = self.bn3(self.conv3(self.pre_conv3(self.relu(out))))
        out = self.attn(out)
        if self.downsample is not None:
            identity = self.downsample(self.pre_downsample(x))
        return self.relu(out + identity)


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        attention: AttentionFactory,
        attention_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock: only groups=1 and base_width=64 are defined")
        overrides = dict(attention_overrides or {})
        make = lambda placement, c: attention.make_or_identity(placement, c, **overrides)  # noqa: E731
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.pre_conv1 = make("before_conv", inplanes)
        self.pre_conv2 = make("before_conv", planes)
        if attention.at("replace_conv2"):
            self.conv2 = attention(planes, out_channels=planes, **overrides)
            self.bn2: nn.Module = nn.Identity()
        else:
            self.conv2 = _conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
        self.attn_conv2 = make("after_conv2", planes)
        self.conv3 = None
        self.bn3 = None
        self.pre_conv3 = nn.Identity()
        self.attn = make("block_end", planes)
        self.downsample = downsample
        self.pre_downsample = (
            make("before_conv", inplanes) if downsample is not None else nn.Identity()
        )
        self.stride = stride


class Bottleneck(_Block):
    """1x1 -> 3x3 (grouped for ResNeXt) -> 1x1, stride on the 3x3 conv (torchvision, "ResNet v1.5")."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        attention: AttentionFactory,
        attention_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        overrides = dict(attention_overrides or {})
        make = lambda placement, c: attention.make_or_identity(placement, c, **overrides)  # noqa: E731
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.pre_conv1 = make("before_conv", inplanes)
        self.pre_conv2 = make("before_conv", width)
        if attention.at("replace_conv2"):
            self.conv2 = attention(
                width, out_channels=width, stride=stride, groups=groups, **overrides
            )
            self.bn2: nn.Module = nn.Identity()
        else:
            self.conv2 = _conv3x3(width, width, stride, groups)
            self.bn2 = nn.BatchNorm2d(width)
        self.attn_conv2 = make("after_conv2", width)
        self.pre_conv3 = make("before_conv", width)
        self.conv3 = _conv1x1(width, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.attn = make("block_end", out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.pre_downsample = (
            make("before_conv", inplanes) if downsample is not None else nn.Identity()
        )
        self.stride = stride


BlockType = type[BasicBlock] | type[Bottleneck]


def _every_other(blocks: int) -> list[int]:
    """Blocks 1, 3, 5, ...: the official non-local ResNets add one after every second block."""
    return list(range(1, blocks, 2))


class _ResNetBase(nn.Module):
    """Network-level placements shared by the ImageNet and CIFAR ResNets."""

    if TYPE_CHECKING:  # for type checkers only: TorchScript cannot read these annotations
        stage_names: tuple[str, ...]
        head_attn: nn.Module
        avgpool: nn.Module

    def _network_attention(
        self, attention: AttentionFactory, widths: list[int], pool_size: int
    ) -> None:
        # stage_end: after every stage but the last (stages 1-3 of an ImageNet ResNet).
        self.stage_attn = nn.ModuleDict()
        if attention.at("stage_end"):
            for name, width in zip(self.stage_names[:-1], widths[:-1], strict=True):
                self.stage_attn[name] = attention(width)
        # every_other_block: after blocks 1, 3, ... of the two stages before the last.
        self.block_attn = nn.ModuleDict()
        if attention.at("every_other_block"):
            for name, width in zip(self.stage_names[-3:-1], widths[-3:-1], strict=True):
                stage = getattr(self, name)
                for index in _every_other(len(stage)):
                    self.block_attn[f"{name}_{index}"] = attention(width)
        self.head_attn = attention(widths[-1]) if attention.at("head") else nn.Identity()
        self.attn_pool: nn.Module | None = None
        if attention.at("pool"):
            self.attn_pool = attention(widths[-1], spatial_size=pool_size)

    # The stages are run by forward_features one by one, by attribute, and the modules of
    # block_attn / stage_attn looked up by iterating the ModuleDicts: TorchScript compiles
    # neither getattr(self, name) nor ModuleDict indexing by a computed key.
    def _block_attention(self, stage: str, index: int, x: torch.Tensor) -> torch.Tensor:
        """The every_other_block module after block ``index`` of ``stage``, if there is one."""
        key = f"{stage}_{index}"
        for name, module in self.block_attn.items():
            if name == key:
                x = module(x)
        return x

    def _stage_attention(self, stage: str, x: torch.Tensor) -> torch.Tensor:
        """The stage_end module after ``stage``, if there is one."""
        for name, module in self.stage_attn.items():
            if name == stage:
                x = module(x)
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_attn(x)
        if self.attn_pool is not None:
            return self.attn_pool(x)
        return torch.flatten(self.avgpool(x), 1)


class ResNet(_ResNetBase):
    """ImageNet ResNet / ResNeXt (torchvision's layout and names), with attention.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        num_classes: classifier outputs.
        groups, width_per_group: ResNeXt cardinality and width (32, 4 for ResNeXt-50 32x4d).
        attention: registry key, module class, or None.
        attention_options: options for every attention module.
        placement: override of the paper placement (``convattn.placement.PLACEMENTS``).
        zero_init_residual: zero the last BN of each block (torchvision's option).
        in_channels: image channels.
    """

    stage_names = ("layer1", "layer2", "layer3", "layer4")
    if TYPE_CHECKING:  # set with setattr in __init__
        layer1: nn.Sequential
        layer2: nn.Sequential
        layer3: nn.Sequential
        layer4: nn.Sequential

    def __init__(
        self,
        block: BlockType,
        layers: list[int],
        num_classes: int = 1000,
        *,
        groups: int = 1,
        width_per_group: int = 64,
        attention: AttentionArg = None,
        attention_options: Mapping[str, Any] | None = None,
        placement: str | None = None,
        zero_init_residual: bool = False,
        in_channels: int = 3,
        name: str = "ResNet",
    ) -> None:
        super().__init__()
        factory = AttentionFactory(attention, attention_options, placement, "resnet", name)
        factory.check_supported(_BLOCK_PLACEMENTS + _NET_PLACEMENTS)
        self.attention_name = factory.name
        self.placement = factory.placement
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = 64
        self.pre_stem = factory.make_or_identity("before_conv", in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stage_option = _STAGE_OPTIONS.get(factory.name or "")
        if stage_option is not None and stage_option[0] in factory.options:
            stage_option = None  # the user's value wins
        widths = []
        for index, (name_, planes, blocks) in enumerate(
            zip(self.stage_names, (64, 128, 256, 512), layers, strict=True)
        ):
            overrides = {stage_option[0]: stage_option[1][index]} if stage_option else {}
            stride = 1 if index == 0 else 2
            setattr(
                self, name_, self._make_layer(block, planes, blocks, stride, factory, overrides)
            )
            widths.append(planes * block.expansion)
        self._network_attention(factory, widths, pool_size=7)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_weights(self, zero_init_residual, factory.name)

    def _make_layer(
        self,
        block: BlockType,
        planes: int,
        blocks: int,
        stride: int,
        factory: AttentionFactory,
        overrides: Mapping[str, Any],
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = []
        for i in range(blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    downsample if i == 0 else None,
                    self.groups,
                    self.base_width,
                    attention=factory,
                    attention_overrides=overrides,
                )
            )
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.pre_stem(x)))))
        for index, block in enumerate(self.layer1):
            x = self._block_attention("layer1", index, block(x))
        x = self._stage_attention("layer1", x)
        for index, block in enumerate(self.layer2):
            x = self._block_attention("layer2", index, block(x))
        x = self._stage_attention("layer2", x)
        for index, block in enumerate(self.layer3):
            x = self._block_attention("layer3", index, block(x))
        x = self._stage_attention("layer3", x)
        for index, block in enumerate(self.layer4):
            x = self._block_attention("layer4", index, block(x))
        return self._stage_attention("layer4", x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._pool(self.forward_features(x)))


class _ShortcutA(nn.Module):
    """He et al.'s option A shortcut: subsample by the stride and zero-pad the new channels."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = planes - inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class CifarResNet(_ResNetBase):
    """CIFAR ResNet (He et al., section 4.2): 3x3 stem, 3 stages of ``n`` basic blocks with
    widths 16-32-64, global average pool, linear classifier; depth = 6n + 2.

    Args:
        depth: 20, 32, 44, 56, 110, ... (6n + 2).
        num_classes: classifier outputs (10 for CIFAR-10).
        shortcut: ``"A"`` (parameter-free, the paper's CIFAR choice) or ``"B"`` (1x1 conv + BN
            projections where the shape changes).
        attention, attention_options, placement: as for :class:`ResNet`.
    """

    stage_names = ("layer1", "layer2", "layer3")
    if TYPE_CHECKING:  # set with setattr in __init__
        layer1: nn.Sequential
        layer2: nn.Sequential
        layer3: nn.Sequential

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        *,
        shortcut: str = "A",
        attention: AttentionArg = None,
        attention_options: Mapping[str, Any] | None = None,
        placement: str | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(
                f"CifarResNet: depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}"
            )
        if shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet: shortcut must be 'A' or 'B', got {shortcut!r}")
        factory = AttentionFactory(
            attention, attention_options, placement, "resnet", f"cifar_resnet{depth}"
        )
        factory.check_supported(_BLOCK_PLACEMENTS + _NET_PLACEMENTS)
        self.attention_name = factory.name
        self.placement = factory.placement
        n = (depth - 2) // 6
        self.pre_stem = factory.make_or_identity("before_conv", in_channels)
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        for index, planes in enumerate((16, 32, 64)):
            stride = 1 if index == 0 else 2
            blocks = []
            for i in range(n):
                downsample: nn.Module | None = None
                if i == 0 and (stride != 1 or inplanes != planes):
                    downsample = (
                        _ShortcutA(inplanes, planes, stride)
                        if shortcut == "A"
                        else nn.Sequential(
                            _conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes)
                        )
                    )
                blocks.append(
                    BasicBlock(
                        inplanes, planes, stride if i == 0 else 1, downsample, attention=factory
                    )
                )
                if shortcut == "A" and isinstance(downsample, _ShortcutA):
                    blocks[-1].pre_downsample = nn.Identity()  # no conv to precede
                inplanes = planes
            setattr(self, self.stage_names[index], nn.Sequential(*blocks))
        self._network_attention(factory, [16, 32, 64], pool_size=8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self, False, factory.name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.pre_stem(x))))
        for index, block in enumerate(self.layer1):
            x = self._block_attention("layer1", index, block(x))
        x = self._stage_attention("layer1", x)
        for index, block in enumerate(self.layer2):
            x = self._block_attention("layer2", index, block(x))
        x = self._stage_attention("layer2", x)
        for index, block in enumerate(self.layer3):
            x = self._block_attention("layer3", index, block(x))
        return self._stage_attention("layer3", x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._pool(self.forward_features(x)))


def _init_weights(model: nn.Module, zero_init_residual: bool, attention: str | None) -> None:
    """torchvision's initialisation, then the official attention-specific inits."""
    for m in backbone_modules(model):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck) and isinstance(m.bn3, nn.BatchNorm2d):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock) and isinstance(m.bn2, nn.BatchNorm2d):
                nn.init.constant_(m.bn2.weight, 0)
    if attention in ("cbam", "cbam_spatial"):
        # CBAM's official ResNet sets the spatial gate's BN weight to 0 (gate starts at 0.5).
        from convattn.layers.cbam import CBAMSpatialGate

        for m in model.modules():
            if isinstance(m, CBAMSpatialGate) and isinstance(m.bn, nn.BatchNorm2d):
                nn.init.zeros_(m.bn.weight)


def _resnet(
    name: str,
    block: BlockType,
    layers: list[int],
    attention: AttentionArg,
    attention_options: Mapping[str, Any] | None,
    placement: str | None,
    **kwargs: Any,
) -> ResNet:
    return ResNet(
        block,
        layers,
        attention=attention,
        attention_options=attention_options,
        placement=placement,
        name=name,
        **kwargs,
    )


def _imagenet(
    name: str, block: BlockType, layers: list[int], **fixed: Any
) -> Callable[..., ResNet]:
    def build(
        attention: AttentionArg = None,
        attention_options: Mapping[str, Any] | None = None,
        placement: str | None = None,
        **kwargs: Any,
    ) -> ResNet:
        return _resnet(
            name, block, layers, attention, attention_options, placement, **fixed, **kwargs
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name}: ImageNet {name.replace('_', ' ')} ({layers} blocks), torchvision's layout, with "
        "``attention`` at its paper placement. Keyword arguments go to :class:`ResNet`."
    )
    return build


resnet18 = _imagenet("resnet18", BasicBlock, [2, 2, 2, 2])
resnet34 = _imagenet("resnet34", BasicBlock, [3, 4, 6, 3])
resnet50 = _imagenet("resnet50", Bottleneck, [3, 4, 6, 3])
resnet101 = _imagenet("resnet101", Bottleneck, [3, 4, 23, 3])
resnet152 = _imagenet("resnet152", Bottleneck, [3, 8, 36, 3])
resnext50_32x4d = _imagenet(
    "resnext50_32x4d", Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4
)


def _cifar(depth: int) -> Callable[..., CifarResNet]:
    def build(
        attention: AttentionArg = None,
        attention_options: Mapping[str, Any] | None = None,
        placement: str | None = None,
        **kwargs: Any,
    ) -> CifarResNet:
        return CifarResNet(
            depth,
            attention=attention,
            attention_options=attention_options,
            placement=placement,
            **kwargs,
        )

    build.__name__ = build.__qualname__ = f"cifar_resnet{depth}"
    build.__doc__ = (
        f"CIFAR ResNet-{depth}: 3 stages of {(depth - 2) // 6} basic blocks, widths 16-32-64."
    )
    return build


cifar_resnet20 = _cifar(20)
cifar_resnet32 = _cifar(32)
cifar_resnet44 = _cifar(44)
cifar_resnet56 = _cifar(56)
cifar_resnet110 = _cifar(110)
