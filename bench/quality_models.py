"""The models the quality suite runs on (``--model tiny|photos|video``): how to load each, its
prompts, and the words the report uses for it. Everything model-specific in the suite is here.

- ``tiny``: the shipped scene model (cat_pruning.tiny), a pixel-space SD3Transformer2DModel, one
  prompt per call with CFG; prompts are distinct captions of its scene generator.
- ``photos``: the photo model (cat_pruning.photos), a pixel-space FluxTransformer2DModel trained on
  crops of scikit-image's photographs, Flux-style without a CFG batch; prompts are its captions
  (photo name and zoom).
- ``video``: the video model (cat_pruning.video), a pixel-space WanTransformer3DModel trained on
  procedural clips (8 frames of 32x32), CFG as one call per branch in cache_context (WanPipeline's
  loop); prompts are held-out clip captions. A clip is scored as its frames side by side, one
  (3, 32, 8 * 32) image: PSNR is the clip's, SSIM the frames' (a window spans two frames only
  along the 7 columns at each seam).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"  # committed: written only when --json names a path here
LOCAL_RESULTS = RESULTS / "local"  # git-ignored: where a run without --json writes
CAPTION_SEED_BASE = 900_000  # scene-generator seeds of the tiny model's prompts (captions are deduplicated)


@dataclasses.dataclass(frozen=True)
class QualityModel:
    name: str  # the --model value
    arch: str  # short architecture name in the report ("SD3", "Flux")
    title: str  # the model as the report's first sentence names it
    prompt_source: str  # what the prompts are, in the report
    call_note: str  # how the pipeline is called, in the report
    plot_title: str
    load: Callable[[str, Any], Any]  # (device, dtype) -> pipeline
    prompts: Callable[[int], list[str]]
    results_stem: str  # bench/results/local/<stem>-<device>.json, .md, .png without --json; <examples> below
    examples_name: str


def tiny_prompts(n: int) -> list[str]:
    """The first n distinct captions of the scene generator from CAPTION_SEED_BASE on."""
    from cat_pruning.tiny import make_example

    caps: list[str] = []
    seed = CAPTION_SEED_BASE
    while len(caps) < n:
        cap = make_example(seed)[1]
        seed += 1
        if cap not in caps:
            caps.append(cap)
    return caps


def _load_tiny(device: str, dtype: Any):
    from cat_pruning.tiny import load_tiny_pipeline

    return load_tiny_pipeline(device=device, dtype=dtype)


def photo_prompts(n: int) -> list[str]:
    """n captions of the photo model, every photo once before any photo twice (zoom levels rotate)."""
    from cat_pruning.photos import eval_prompts

    return eval_prompts(n)


def _load_photos(device: str, dtype: Any):
    from cat_pruning.photos import load_photo_pipeline

    return load_photo_pipeline(device=device, dtype=dtype)


def video_prompts(n: int) -> list[str]:
    """n distinct held-out clip captions (clips the training never draws)."""
    from cat_pruning.video import eval_captions

    return eval_captions(n)


def _load_video(device: str, dtype: Any):
    from cat_pruning.video import load_video_pipeline

    return load_video_pipeline(device=device, dtype=dtype)


def first_image(output: Any) -> Any:
    """The first image of a pipeline call's "pt" output as (3, H, W) on the CPU; a video's frames
    side by side, (3, H, F * W)."""
    if hasattr(output, "frames"):
        clip = output.frames[0].float().cpu()  # (3, F, H, W)
        return clip.permute(0, 2, 1, 3).flatten(2)
    return output.images[0].float().cpu()


MODELS: dict[str, QualityModel] = {
    "tiny": QualityModel(
        name="tiny",
        arch="SD3",
        title="Shipped tiny model (`cat_pruning.tiny`, SD3Transformer2DModel",
        prompt_source="scene-generator captions",
        call_note="one prompt per call with CFG",
        plot_title="Tiny SD3 model",
        load=_load_tiny,
        prompts=tiny_prompts,
        results_stem="quality",
        examples_name="quality-examples.png",
    ),
    "photos": QualityModel(
        name="photos",
        arch="Flux",
        title="Photo model (`cat_pruning.photos`, FluxTransformer2DModel trained on crops of scikit-image's "
        "photographs",
        prompt_source="photo captions: name and zoom",
        call_note="one prompt per call, no CFG batch (Flux style)",
        plot_title="Photo Flux model",
        load=_load_photos,
        prompts=photo_prompts,
        results_stem="quality-photos",
        examples_name="quality-photos-examples.png",
    ),
    "video": QualityModel(
        name="video",
        arch="Wan",
        title="Video model (`cat_pruning.video`, WanTransformer3DModel trained on procedural clips of shapes "
        "moving over static textures",
        prompt_source="held-out clip captions",
        call_note="one clip per call, CFG as one transformer call per branch (WanPipeline's loop)",
        plot_title="Video Wan model",
        load=_load_video,
        prompts=video_prompts,
        results_stem="quality-video",
        examples_name="quality-video-examples.png",
    ),
}


def get(name: str) -> QualityModel:
    if name not in MODELS:
        raise SystemExit(f"bench quality: unknown --model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


class Generator:
    """A shipped model's pipeline, called as the sweeps call it: one (prompt, seed) item per call at
    the pipeline's default steps (or `steps`) and guidance, fp32, images as (3, H, W) CPU tensors,
    counted on one progress bar (off when CAT_BENCH_NO_PROGRESS=1)."""

    def __init__(self, model: QualityModel, device: str, seed: int, desc: str, total: int | None = None,
                 steps: int | None = None) -> None:  # fmt: skip
        import inspect
        import os
        import sys

        import torch
        from tqdm.auto import tqdm

        torch.manual_seed(seed)
        self.pipe = model.load(device, torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        defaults = inspect.signature(type(self.pipe).__call__).parameters
        self.steps = steps or defaults["num_inference_steps"].default
        self.guidance = defaults["guidance_scale"].default
        self.bar = tqdm(total=total, desc=desc, unit="gen", file=sys.stderr,
                        disable=os.environ.get("CAT_BENCH_NO_PROGRESS") == "1")  # fmt: skip

    def __call__(self, item: tuple[str, int]) -> Any:
        import torch

        prompt, seed = item
        out = self.pipe(prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")  # fmt: skip
        self.bar.update()
        return first_image(out)

    def measure(self, config: Any, items: list[tuple[str, int]], dense: list[Any] | None = None) -> dict:
        """Patch with `config`, generate `items`, unpatch. MAC fraction (mean over the items),
        tokens per pruned step and N from cat_pruning.stats; with `dense` (the dense images of the
        same items) also the per-image PSNR, its mean and worst, and the mean SSIM."""
        import statistics

        import cat_pruning
        from cat_pruning.metrics import psnr, ssim

        cat_pruning.patch(self.pipe, config)
        try:
            images, macs = [], []
            for item in items:
                images.append(self(item))
                macs.append(cat_pruning.stats(self.pipe).mac_fraction)
            st = cat_pruning.stats(self.pipe)
        finally:
            cat_pruning.unpatch(self.pipe)
        out = dict(mac_fraction=statistics.fmean(macs), tokens_kept=st.tokens_kept, num_tokens=st.num_tokens)
        if dense is not None:
            scores = [psnr(img, ref) for img, ref in zip(images, dense, strict=True)]
            out.update(psnr=scores, psnr_mean=statistics.fmean(scores), psnr_worst=min(scores),
                       ssim_mean=statistics.fmean(ssim(i, r) for i, r in zip(images, dense, strict=True)))  # fmt: skip
        return out


@contextlib.contextmanager
def psnr_plot(png_path: Path, title: str) -> Iterator[Any]:
    """Axes for a PSNR-against-MACs plot (None without matplotlib: no plot), labelled and saved to
    png_path when the block ends."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        yield None
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    yield ax
    ax.set_xlabel("MACs (fraction of dense)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
