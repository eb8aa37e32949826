"""The project's photo model: a pixel-space FluxTransformer2DModel (double- and single-stream
blocks, rotary positions) trained on random crops of the photographs that scikit-image's wheel
bundles (tools/train_photo_model.py), captioned "<photo>, <zoom>". Real edges and textures, for
judging pruning and caching where the scene model's flat colours are too easy.

    from cat_pruning.photos import load_photo_pipeline
    pipe = load_photo_pipeline()
    image = pipe("coffee, close-up", generator=torch.Generator().manual_seed(0)).images[0]

scikit-image is needed only to train (cat_pruning.photos.data); loading and sampling need none.
"""

from .captions import PHOTOS, VOCAB, ZOOMS, all_captions, caption, eval_prompts
from .pipeline import WEIGHTS_DIR, PhotoFluxPipeline, image_ids, load_photo_pipeline, pack, unpack

__all__ = [
    "PHOTOS",
    "VOCAB",
    "WEIGHTS_DIR",
    "ZOOMS",
    "PhotoFluxPipeline",
    "all_captions",
    "caption",
    "eval_prompts",
    "image_ids",
    "load_photo_pipeline",
    "pack",
    "unpack",
]
