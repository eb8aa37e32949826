"""The project's own tiny text-to-image model: a pixel-space SD3Transformer2DModel trained on
procedural shape scenes, used by tests and as the default model of `make demo`.

    from cat_pruning.tiny import load_tiny_pipeline
    pipe = load_tiny_pipeline()
    image = pipe("a red circle above a blue square on a yellow background",
                 generator=torch.Generator().manual_seed(0)).images[0]
"""

from .pipeline import WEIGHTS_DIR, TinyT2IPipeline, image_grid, load_tiny_pipeline
from .scenes import VOCAB, make_batch, make_example, render_scene, sample_scene
from .text import TinyTextEncoder, TinyTokenizer

__all__ = [
    "WEIGHTS_DIR",
    "TinyT2IPipeline",
    "TinyTextEncoder",
    "TinyTokenizer",
    "VOCAB",
    "image_grid",
    "load_tiny_pipeline",
    "make_batch",
    "make_example",
    "render_scene",
    "sample_scene",
]
