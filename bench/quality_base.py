"""Quality suite, the shared pieces: a method (``Method``) and its session protocol, the session of
the dense reference (``no_session``), the CATConfig fields of a CAT method's params, and how
``field=value`` text becomes CATConfig overrides.

The quality parts import each other in one direction only, each from the ones below it:
quality.py -> quality_methods -> quality_peers -> quality_measure -> quality_base (this module,
which imports none of them)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import cat_pruning

# Method params that log how a method was tuned, not settings of the method.
TUNING_LOGS = ("tuning", "screening", "schedule_screening")

Session = Callable[[Any], contextlib.AbstractContextManager]  # pipe -> context yielding a per-call reset or None


@dataclasses.dataclass
class Method:
    id: str
    name: str
    group: str  # dense | cat | ablation | catf | peer
    params: dict[str, Any]
    session: Session
    data_dependent: bool = False  # compute depends on the images (threshold-driven caches)
    tune: Callable[..., None] | None = None  # peers: sets params to land near the target MACs
    # peers: (label, params update) tried in order until one runs
    variants: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    # peers: knob values for the probe that make it cache as much as it can (so the cached path runs)
    probe_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    matched_to: str | None = None  # tuned methods: the budget (cat:K:F or mac:X) they are tuned to (None: --target-cat)


@contextlib.contextmanager
def no_session(pipe) -> Iterator[None]:
    """The dense reference: the unpatched pipeline, no per-call reset."""
    yield None


def cat_config_fields(params: dict[str, Any]) -> dict[str, Any]:
    """The CATConfig fields among a CAT method's params (tuned ones also carry their tuning log)."""
    names = {f.name for f in dataclasses.fields(cat_pruning.CATConfig)}
    return {k: v for k, v in params.items() if k in names}


def config_overrides(pairs: list[str]) -> dict[str, Any]:
    """``field=value`` texts -> CATConfig overrides; numbers take the type of the field's default
    (num_clusters=1 -> int, importance_fraction=0 -> float), everything else stays text."""
    defaults = cat_pruning.CATConfig()
    out: dict[str, Any] = {}
    for kv in pairs:
        key, _, value = kv.partition("=")
        default = getattr(defaults, key, None)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        out[key] = type(default)(value) if numeric else value
    return out
