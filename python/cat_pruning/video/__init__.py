"""The project's video model: a pixel-space diffusers WanTransformer3DModel trained on procedural
clips of coloured shapes moving or growing over static textures (tools/train_video_model.py),
captioned "a red circle moving left over blue stripes". Mostly static backgrounds under moving
shapes: the case token-level pruning is made for.

    from cat_pruning.video import load_video_pipeline
    pipe = load_video_pipeline()
    frames = pipe("a red circle moving left over blue stripes",
                  generator=torch.Generator().manual_seed(0)).frames[0]  # (8, 32, 32, 3) in [0, 1]
"""

from .clips import FRAMES, SIZE, VOCAB, eval_captions, random_clip, render
from .pipeline import WEIGHTS_DIR, TinyWanPipeline, load_video_pipeline

__all__ = ["FRAMES", "SIZE", "VOCAB", "WEIGHTS_DIR", "TinyWanPipeline", "eval_captions", "load_video_pipeline",
           "random_clip", "render"]
