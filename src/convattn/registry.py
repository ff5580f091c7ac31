"""The attention registry: one record per mechanism, one constructor contract.

Every module is registered once with ``@register(...)``: its key, kind, paper, year, arXiv
link, the placement it was designed for, the spatial dims it supports and any deliberate
difference from the official code. ``create``, ``list_attention`` and ``info`` read it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "CONTRACTS",
    "KINDS",
    "AttentionSpec",
    "create",
    "info",
    "list_attention",
    "markdown_table",
    "register",
]

KINDS = ("channel", "spatial", "hybrid", "self-attention", "pooling")
# "gate": (N, C, *spatial) -> same shape; "conv": a convolution (in/out channels, stride);
# "pool": a pooling head, (N, C, *spatial) -> (N, C) or (N, out_dim).
CONTRACTS = ("gate", "conv", "pool")

M = TypeVar("M", bound=type[nn.Module])


@dataclass(frozen=True)
class AttentionSpec:
    """What the registry knows about one attention mechanism."""

    name: str
    cls: type[nn.Module]
    kind: str
    paper: str
    year: int
    arxiv: str
    placement: str
    spatial_dims: tuple[int, ...] = (1, 2, 3)
    differences: tuple[str, ...] = ()
    contract: str = "gate"
    presets: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    summary: str = ""

    @property
    def link(self) -> str:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else ""

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options the constructor takes (those fixed by presets excluded)."""
        return tuple(n for n in _keyword_options(self.cls) if n not in self.presets)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option with its default: the paper's/official code's configuration."""
        params = inspect.signature(self.cls.__init__).parameters
        values = {n: params[n].default for n in _keyword_options(self.cls)}
        values.update(self.presets)
        return values

    def create(self, channels: int, **options: Any) -> nn.Module:
        return create(self.name, channels, **options)

    def describe(self) -> str:
        """A multi-line, human-readable description (what ``convattn info NAME`` prints)."""
        lines = [
            f"{self.name}: {self.cls.__module__}.{self.cls.__qualname__}",
            f"  paper:        {self.paper} ({self.year})",
            f"  link:         {self.link or '-'}",
            f"  kind:         {self.kind} ({_CONTRACT_TEXT[self.contract]})",
            f"  placement:    {self.placement}",
            f"  spatial_dims: {', '.join(map(str, self.spatial_dims))}",
        ]
        if self.aliases:
            lines.append(f"  aliases:      {', '.join(self.aliases)}")
        if self.summary:
            lines.append(f"  summary:      {self.summary}")
        lines.append("  defaults:")
        for key, value in self.defaults.items():
            fixed = " (fixed by this entry)" if key in self.presets else ""
            lines.append(f"    {key} = {_format_default(value)}{fixed}")
        if self.differences:
            lines.append("  differences from the official code / paper:")
            lines.extend(f"    - {d}" for d in self.differences)
        return "\n".join(lines)


_CONTRACT_TEXT = {
    "gate": "same shape in and out",
    "conv": "a convolution: in/out channels and stride; create(name, C) gives C -> C, stride 1",
    "pool": "a pooling head: (N, C, *spatial) -> (N, C) or (N, out_dim)",
}

_REGISTRY: dict[str, AttentionSpec] = {}
_ALIASES: dict[str, str] = {}


def _keyword_options(cls: type[nn.Module]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _format_default(value: Any) -> str:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def register(
    name: str,
    *,
    kind: str,
    paper: str,
    year: int,
    arxiv: str,
    placement: str,
    spatial_dims: tuple[int, ...] = (1, 2, 3),
    differences: tuple[str, ...] = (),
    contract: str = "gate",
    presets: Mapping[str, Any] | None = None,
    aliases: tuple[str, ...] = (),
    summary: str = "",
) -> Callable[[M], M]:
    """Class decorator adding a module to the registry under ``name``.

    Decorators may be stacked to register one class under several keys with different
    ``presets`` (fixed options). A name or alias that is already taken is an error.
    """
    if kind not in KINDS:
        raise ValueError(f"register({name!r}): kind must be one of {list(KINDS)}, got {kind!r}")
    if contract not in CONTRACTS:
        raise ValueError(
            f"register({name!r}): contract must be one of {list(CONTRACTS)}, got {contract!r}"
        )
    if name != name.lower() or not name:
        raise ValueError(f"register({name!r}): registry keys are non-empty and lower-case")

    def decorator(cls: M) -> M:
        for key in (name, *aliases):
            if key in _REGISTRY or key in _ALIASES:
                raise ValueError(f"register: the name {key!r} is already registered")
        unknown = set(presets or {}) - set(_keyword_options(cls))
        if unknown:
            raise ValueError(f"register({name!r}): presets name unknown options {sorted(unknown)}")
        _REGISTRY[name] = AttentionSpec(
            name=name,
            cls=cls,
            kind=kind,
            paper=paper,
            year=year,
            arxiv=arxiv,
            placement=placement,
            spatial_dims=tuple(spatial_dims),
            differences=tuple(differences),
            contract=contract,
            presets=MappingProxyType(dict(presets or {})),
            aliases=tuple(aliases),
            summary=summary,
        )
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorator


_loaded = False


def _ensure_loaded() -> None:
    """Import every family file of ``convattn.layers``: each registers itself on import."""
    global _loaded
    if _loaded:
        return
    import convattn.layers as layers_pkg

    for module in pkgutil.iter_modules(layers_pkg.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{layers_pkg.__name__}.{module.name}")
    _loaded = True


def _lookup(name: str) -> AttentionSpec:
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a str, got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        known = sorted([*_REGISTRY, *_ALIASES])
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown attention {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[key]


def create(name: str, channels: int, **options: Any) -> nn.Module:
    """Build the attention module registered as ``name`` for ``channels`` channels.

    ``options`` are the module's keyword options (see ``info(name).defaults``). An unknown
    name raises ``ValueError`` listing the closest registered names; an unknown option raises
    ``TypeError`` naming it.
    """
    spec = _lookup(name)
    valid = spec.options
    for key in options:
        if key in spec.presets:
            raise TypeError(
                f"create({spec.name!r}): option {key!r} is fixed to {spec.presets[key]!r} by this entry"
            )
        if key not in valid:
            raise TypeError(
                f"create({spec.name!r}): unknown option {key!r} for {spec.cls.__name__}; "
                f"valid options: {', '.join(valid)}"
            )
    return spec.cls(channels, **{**spec.presets, **options})


def list_attention(kind: str | None = None) -> list[str]:
    """Registered keys (aliases excluded), sorted; only those of ``kind`` when given."""
    _ensure_loaded()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"list_attention: kind must be one of {list(KINDS)} or None, got {kind!r}")
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def info(name: str) -> AttentionSpec:
    """The registry record of ``name`` (paper, year, link, kind, placement, defaults,
    documented differences from the official code)."""
    return _lookup(name)


def count_params(name: str, channels: int = 256) -> int:
    """Parameters of ``create(name, channels)`` with its defaults."""
    module = create(name, channels)
    return sum(p.numel() for p in module.parameters())


def table_rows(channels: int = 256) -> list[dict[str, Any]]:
    """One row per registered module: name, kind, paper, year, link, params at ``channels``."""
    rows = []
    for name in list_attention():
        spec = _REGISTRY[name]
        rows.append(
            {
                "name": name,
                "kind": spec.kind,
                "paper": spec.paper,
                "year": spec.year,
                "link": spec.link,
                "params": count_params(name, channels),
            }
        )
    return rows


def markdown_table(channels: int = 256) -> str:
    """The README's module table, generated from the registry."""
    lines = [
        f"| key | kind | paper | year | params at C={channels} |",
        "|---|---|---|---|---:|",
    ]
    for row in table_rows(channels):
        paper = f"[{row['paper']}]({row['link']})" if row["link"] else row["paper"]
        lines.append(
            f"| `{row['name']}` | {row['kind']} | {paper} | {row['year']} | {row['params']:,} |"
        )
    return "\n".join(lines)
