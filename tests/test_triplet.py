"""Triplet attention against a reference written from the paper and the official permutes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convattn import registry
from convattn.layers.triplet import TripletAttention


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial weights, BN affine and BN running statistics."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.5)
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)


def _branch(view: torch.Tensor, branch: torch.nn.Module, training: bool) -> torch.Tensor:
    """Z-pool over dim 1 of ``view``, conv, BN, sigmoid, multiply (the official gate)."""
    pooled = torch.cat([view.max(dim=1)[0].unsqueeze(1), view.mean(dim=1).unsqueeze(1)], dim=1)
    weight = branch.conv.weight
    logits = F.conv2d(pooled, weight, padding=(weight.shape[-1] - 1) // 2)
    bn = branch.bn
    logits = F.batch_norm(
        logits,
        bn.running_mean.clone(),
        bn.running_var.clone(),
        bn.weight,
        bn.bias,
        training=training,
        eps=1e-5,
    )
    return view * torch.sigmoid(logits)


def triplet_reference(
    x: torch.Tensor, module: TripletAttention, training: bool = False
) -> torch.Tensor:
    # (N, H, C, W): pool over H, gate the (C, W) plane.
    out_cw = _branch(x.permute(0, 2, 1, 3), module.cw, training).permute(0, 2, 1, 3)
    # (N, W, H, C): pool over W, gate the (H, C) plane.
    out_hc = _branch(x.permute(0, 3, 2, 1), module.hc, training).permute(0, 3, 2, 1)
    if module.hw is None:
        return (out_cw + out_hc) / 2
    out_hw = _branch(x, module.hw, training)
    return (out_hw + out_cw + out_hc) / 3


@pytest.mark.parametrize(
    ("options", "shape"),
    [
        ({}, (2, 5, 6, 9)),
        ({"kernel_size": 3}, (2, 4, 7, 5)),
        ({"no_spatial": True}, (3, 6, 5, 8)),
        ({}, (1, 3, 1, 1)),
    ],
)
def test_matches_reference_eval(options: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = TripletAttention(shape[1], **options).double().eval()
    _randomise(module)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(module(x), triplet_reference(x, module))


@pytest.mark.parametrize("no_spatial", [False, True])
def test_matches_reference_train(no_spatial: bool) -> None:
    torch.manual_seed(1)
    module = TripletAttention(5, no_spatial=no_spatial).double().train()
    _randomise(module)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    expected = triplet_reference(x, module, training=True)
    torch.testing.assert_close(module(x), expected)


def test_gates_are_hookable() -> None:
    module = TripletAttention(4).eval()
    shapes = {}
    for name, sub in module.named_modules():
        if name.split(".")[-1].startswith("gate"):
            sub.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    module(torch.randn(2, 4, 5, 6))
    assert shapes == {
        "cw.gate": (2, 1, 4, 6),
        "hc.gate": (2, 1, 5, 4),
        "hw.gate": (2, 1, 5, 6),
    }


@pytest.mark.parametrize("channels", [64, 256, 2048])
def test_param_count(channels: int) -> None:
    k = 7
    per_branch = 2 * k * k + 2  # conv 2->1 without bias, BN weight and bias
    assert sum(p.numel() for p in TripletAttention(channels).parameters()) == 3 * per_branch == 300
    no_spatial = TripletAttention(channels, no_spatial=True)
    assert sum(p.numel() for p in no_spatial.parameters()) == 2 * per_branch == 200
    assert registry.count_params("triplet", channels) == 300


def test_defaults_and_registry() -> None:
    spec = registry.info("triplet")
    assert spec.cls is TripletAttention
    assert spec.kind == "hybrid"
    assert spec.spatial_dims == (2,)
    assert spec.defaults == {"kernel_size": 7, "no_spatial": False, "spatial_dims": 2}


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"^TripletAttention: spatial_dims"):
        TripletAttention(8, spatial_dims=3)
    with pytest.raises(ValueError, match=r"^TripletAttention: kernel_size must be odd"):
        TripletAttention(8, kernel_size=4)
    with pytest.raises(ValueError, match=r"^TripletAttention: expected 8 channels"):
        TripletAttention(8)(torch.randn(1, 4, 3, 3))
