"""One adapter per model family; `find_adapter` picks the one for a transformer."""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .dit import DiTAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .pixart import PixArtAdapter
from .qwenimage import QwenImageAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter

ADAPTERS: tuple[Adapter, ...] = (
    SD3Adapter(),
    PixArtAdapter(),
    DiTAdapter(),
    FluxAdapter(),
    SanaAdapter(),
    QwenImageAdapter(),
    Flux2Adapter(),
    WanAdapter(),
)


def supported_families() -> str:
    return ", ".join(a.family for a in ADAPTERS)


def find_adapter(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"cat_pruning does not support {type(model).__name__}; supported: {supported_families()}")
