"""cat_pruning: CAT Pruning (cluster-aware token pruning) for diffusion transformers in diffusers.

import cat_pruning
cat_pruning.patch(pipe)                 # CAT-F; the paper's CAT: patch(pipe, CATConfig.paper())
image = pipe(prompt).images[0]
print(cat_pruning.stats(pipe))
cat_pruning.unpatch(pipe)
"""

from .api import advance, is_patched, patch, patched, reset, stats, unpatch
from .config import CATConfig
from .stats import CATStats, StepStats

__all__ = [
    "patch",
    "unpatch",
    "reset",
    "advance",
    "is_patched",
    "patched",
    "stats",
    "CATConfig",
    "CATStats",
    "StepStats",
]
__version__ = "0.1.0"
