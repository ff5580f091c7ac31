"""Generic channel attention: describe (global pooling), excite (reduced MLP or 1-D conv over
channels), gate (sigmoid or hard-sigmoid), apply (per-channel multiply).

SE, ECA and CBAM's channel gate are configurations of this module (see ``se.py``,
``eca.py`` and ``cbam.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from convattn.layers._helpers import (
    ActLayer,
    AttentionModule,
    amax,
    check_choice,
    check_positive_int,
    create_act,
    eca_kernel_size,
    mean,
    mean_amax,
    reduced_channels,
    unsqueeze_spatial,
)
from convattn.registry import register

__all__ = ["ChannelAttention"]

POOLS = ("avg", "max", "avg+max", "std")
EXCITATIONS = ("mlp", "conv1d")
GATES = ("sigmoid", "hard_sigmoid")


@register(
    "channel",
    kind="channel",
    paper="Generic channel attention (the SE / ECA / CBAM-channel family)",
    year=2018,
    arxiv="1709.01507",
    placement="anywhere a per-channel reweighting fits; in a ResNet block after the last BN, before the residual add",
    summary="pool avg/max/avg+max/std -> reduced MLP or 1-D conv over channels -> sigmoid/hard-sigmoid -> multiply",
)
class ChannelAttention(AttentionModule):
    """Configurable channel attention ``y = x * gate(excite(pool(x)))``.

    Args:
        channels: C, the number of input (and output) channels.
        pool: the descriptor (describe step). ``"avg"``: global average (SE's squeeze
            ``z_c = 1/HW sum x_c``); ``"max"``: global max; ``"avg+max"``: both, sent through the
            same excitation and summed before the gate (CBAM's ``MLP(avg) + MLP(max)``);
            ``"std"``: global standard deviation ``sqrt(var + 1e-5)`` (population variance).
        excitation: ``"mlp"``: ``W2 act(W1 z)`` with ``W1: C -> C*rd_ratio`` (SE's ``W1``,
            ``W2`` and ``delta`` in eq. 3); ``"conv1d"``: a 1-D convolution of size
            ``kernel_size`` across the channel axis (ECA's local cross-channel interaction).
        rd_ratio, rd_channels, rd_divisor: width of the MLP bottleneck (``C * rd_ratio``
            floored; ``rd_channels`` overrides; ``rd_divisor`` rounds to a multiple). MLP only.
        act_layer: activation between the two MLP layers (``delta``). MLP only.
        bias: biases in the excitation; defaults to True for the MLP, False for the 1-D conv.
        kernel_size: 1-D conv size; None takes ECA's adaptive size from ``gamma`` and
            ``beta``. conv1d only.
        gate_layer: ``"sigmoid"`` (``sigma``) or ``"hard_sigmoid"``.
        spatial_dims: 1, 2 or 3.

    Shape:
        - Input: ``(N, C, *spatial)`` with ``len(spatial) == spatial_dims``.
        - Output: same shape and dtype as the input.
    """

    def __init__(
        self,
        channels: int,
        *,
        pool: str = "avg",
        excitation: str = "mlp",
        rd_ratio: float | None = None,
        rd_channels: int | None = None,
        rd_divisor: int | None = None,
        act_layer: ActLayer | None = None,
        bias: bool | None = None,
        kernel_size: int | None = None,
        gamma: float | None = None,
        beta: float | None = None,
        gate_layer: str = "sigmoid",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(channels, spatial_dims)
        owner = type(self).__name__
        check_choice(owner, "pool", pool, POOLS)
        check_choice(owner, "excitation", excitation, EXCITATIONS)
        check_choice(owner, "gate_layer", gate_layer, GATES)
        mlp_only = {
            "rd_ratio": rd_ratio,
            "rd_channels": rd_channels,
            "rd_divisor": rd_divisor,
            "act_layer": act_layer,
        }
        conv_only = {"kernel_size": kernel_size, "gamma": gamma, "beta": beta}
        unused = mlp_only if excitation == "conv1d" else conv_only
        given = [k for k, v in unused.items() if v is not None]
        if given:
            raise ValueError(
                f"{owner}: option(s) {given} do not apply to excitation={excitation!r}"
            )
        self.pool = pool
        self.excitation = excitation

        if excitation == "mlp":
            use_bias = True if bias is None else bias
            self.rd_channels = reduced_channels(
                channels,
                1 / 16 if rd_ratio is None else rd_ratio,
                rd_channels,
                rd_divisor,
                owner=owner,
            )
            self.fc1 = nn.Linear(channels, self.rd_channels, bias=use_bias)
            self.act = create_act("relu" if act_layer is None else act_layer, owner=owner)
            self.fc2 = nn.Linear(self.rd_channels, channels, bias=use_bias)
        else:
            use_bias = False if bias is None else bias
            if kernel_size is None:
                kernel_size = eca_kernel_size(
                    channels, 2 if gamma is None else gamma, 1 if beta is None else beta
                )
            check_positive_int(owner, "kernel_size", kernel_size)
            if kernel_size % 2 == 0:
                raise ValueError(
                    f"{owner}: kernel_size must be odd to keep C outputs, got {kernel_size}"
                )
            self.kernel_size = kernel_size
            self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=use_bias)
        self.gate = nn.Sigmoid() if gate_layer == "sigmoid" else nn.Hardsigmoid()

    def describe(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pooled descriptors, each (N, C)."""
        dims = list(range(2, x.dim()))
        if self.pool == "avg":
            return [mean(x, dims).flatten(1)]
        if self.pool == "max":
            return [amax(x, dims).flatten(1)]
        if self.pool == "avg+max":
            avg, peak = mean_amax(x, dims)
            return [avg.flatten(1), peak.flatten(1)]
        var = x.var(dims, correction=0)
        return [torch.sqrt(var + 1e-5)]

    def excite(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C) descriptor -> (N, C) pre-gate weights."""
        # hasattr (not the excitation string) so that TorchScript only compiles the branch
        # whose layers exist.
        if hasattr(self, "fc1"):
            return self.fc2(self.act(self.fc1(z)))
        return self.conv(z.unsqueeze(1)).squeeze(1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights in (0, 1), shape (N, C)."""
        descriptors = self.describe(x)
        logits = self.excite(descriptors[0])
        for z in descriptors[1:]:
            logits = logits + self.excite(z)
        return self.gate(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x * unsqueeze_spatial(self.attention(x), self.spatial_dims)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool={self.pool!r}, excitation={self.excitation!r}"
