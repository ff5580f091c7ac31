"""How a reference backbone builds its attention modules: one factory per network, shared by
every block, reading the paper placement from ``convattn.placement``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from convattn import registry
from convattn.placement import PLACEMENTS, paper_placement

__all__ = ["AttentionArg", "AttentionFactory", "backbone_modules"]

AttentionArg = str | type[nn.Module] | None


class AttentionFactory:
    """Builds the attention modules of one network.

    Args:
        attention: a registry key, an ``nn.Module`` class taking ``(channels, **options)``, or
            None (no attention).
        options: keyword options for every module.
        placement: a key of ``convattn.placement.PLACEMENTS``; None takes the paper placement
            of ``attention`` for ``family``.
        family: ``"resnet"`` or ``"mobilenetv2"``.
        owner: the model name, for error messages.
    """

    def __init__(
        self,
        attention: AttentionArg,
        options: Mapping[str, Any] | None,
        placement: str | None,
        family: str,
        owner: str,
    ) -> None:
        self.owner = owner
        self.options = dict(options or {})
        self.name: str | None = None
        self.builder: Callable[..., nn.Module] | None = None
        if attention is None:
            if self.options:
                raise ValueError(f"{owner}: attention_options given without an attention")
            self.placement = "none"
            return
        if isinstance(attention, str):
            spec = registry.info(attention)
            self.name = spec.name
            self.builder = lambda channels, **kw: registry.create(spec.name, channels, **kw)
            default = paper_placement(spec.name, family)
        elif isinstance(attention, type) and issubclass(attention, nn.Module):
            self.name = attention.__name__
            self.builder = attention
            default = "block_end"
        else:
            raise TypeError(
                f"{owner}: attention must be a registry name, an nn.Module class or None, "
                f"got {type(attention).__name__}"
            )
        if placement is not None and placement not in PLACEMENTS:
            raise ValueError(
                f"{owner}: placement must be one of {list(PLACEMENTS)} or None, got {placement!r}"
            )
        self.placement = placement or default

    def __bool__(self) -> bool:
        return self.builder is not None

    def at(self, placement: str) -> bool:
        """Whether modules go at ``placement``."""
        return self.placement == placement

    def __call__(self, channels: int, **overrides: Any) -> nn.Module:
        if self.builder is None:
            raise RuntimeError(f"{self.owner}: no attention configured")
        return self.builder(channels, **{**overrides, **self.options})

    def make_or_identity(self, placement: str, channels: int, **overrides: Any) -> nn.Module:
        """An attention module if modules go at ``placement``, else ``nn.Identity()``."""
        return self(channels, **overrides) if self.at(placement) else nn.Identity()

    def check_supported(self, supported: tuple[str, ...]) -> None:
        if self and self.placement not in supported:
            raise ValueError(
                f"{self.owner}: placement {self.placement!r} is not available in this backbone; "
                f"supported: {list(supported)}"
            )


def backbone_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of ``model`` outside its attention modules, for the backbone's weight init
    (attention modules keep their own, official, initialisation)."""
    from convattn.layers._helpers import AttentionModule

    inside = {id(s) for m in model.modules() if isinstance(m, AttentionModule) for s in m.modules()}
    return (m for m in model.modules() if id(m) not in inside)
