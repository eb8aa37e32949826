#!/usr/bin/env python
"""Train the photo model (cat_pruning.photos): a pixel-space FluxTransformer2DModel on random crops
of scikit-image's bundled photographs, with rectified flow.

Shares the scene model's machinery (tools/train_tiny_t2i.py: the learning-rate schedule, the
EMA, the text encoder, the logit-normal timesteps, x_t = (1 - sigma) * x0 + sigma * noise,
target = noise - x0), Flux-style: images packed 2x2 into 1024 tokens of 12 channels, img_ids
(0, row, col) for the rotary positions, the timestep as sigma in [0, 1]. Captions are
"<photo>, <zoom>" (cat_pruning.photos.captions); they are dropped with --caption-dropout so the
pipeline can also run CFG, though it runs without a CFG batch by default.

    pip install 'cat-pruning[train]'         # scikit-image: the photographs
    python tools/train_photo_model.py --out DIR [--steps N --batch-size B --tiny-config]

Reproducible: every step's batch, noise, timesteps and caption dropout come from generators
seeded by (--seed, step), so a run resumed from DIR/checkpoint.pt (--resume; written every
--save-every steps and when --max-minutes stops it) continues exactly as an uninterrupted one
would, with the same number of threads. The shipped weights were trained with the command in
cat_pruning/photos/weights/train_summary.json ("command").

Writes to DIR: a diffusers pipeline (model_index.json, transformer/, text_encoder/, scheduler/;
safetensors, the EMA weights), train_log.csv (step, loss, lr, elapsed_s; appended on resume),
checkpoint.pt (training state, not shipped), train_summary.json and samples.png (+ samples.json):
per photo, a real crop and generated images at each zoom level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import cat_pruning.photos  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_loop  # noqa: E402  (the loop, checkpoints and summary the video model's training shares)
from diffusers import FluxTransformer2DModel  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cat_pruning.photos.captions import VOCAB, ZOOMS, caption  # noqa: E402
from cat_pruning.photos.pipeline import PATCH, PhotoFluxPipeline, image_ids, pack  # noqa: E402
from cat_pruning.tiny.text import TinyTextEncoder  # noqa: E402

# double = FluxTransformerBlock (MM-DiT, text and image streams), single = FluxSingleTransformerBlock
FULL = dict(double=2, single=2, heads=3, head_dim=32, rope=(8, 12, 12), text_dim=96, text_layers=2, max_length=8)
TINY = dict(double=1, single=1, heads=2, head_dim=16, rope=(4, 6, 6), text_dim=32, text_layers=1, max_length=8)


def build_models(c: dict) -> tuple[FluxTransformer2DModel, TinyTextEncoder]:
    if sum(c["rope"]) != c["head_dim"]:
        raise ValueError(f"rope axes {c['rope']} must add up to head_dim {c['head_dim']}")
    transformer = FluxTransformer2DModel(
        patch_size=1,  # the pipeline packs 2x2 pixels per token, as FluxPipeline packs latents
        in_channels=3 * PATCH * PATCH,
        num_layers=c["double"],
        num_single_layers=c["single"],
        attention_head_dim=c["head_dim"],
        num_attention_heads=c["heads"],
        joint_attention_dim=c["text_dim"],
        pooled_projection_dim=c["text_dim"],
        guidance_embeds=False,
        axes_dims_rope=tuple(c["rope"]),
    )
    return transformer, train_loop.text_encoder(VOCAB, c)


def save_pipeline(out: Path, transformer, text_encoder, shift: float) -> PhotoFluxPipeline:
    return train_loop.save_pipeline(PhotoFluxPipeline, out, transformer, text_encoder, shift)


def write_samples(pipe: PhotoFluxPipeline, data, out: Path, steps: int, seeds=(0, 1), scale: int = 2) -> None:
    """samples.png: one row per photo; per zoom level a real central crop, then one generated image
    per seed (all rows share the seeds). samples.json says what is where."""
    pipe.set_progress_bar_config(disable=True)
    photos, zooms = list(data.photos), list(ZOOMS)
    prompts = [caption(p, z) for p in photos for z in zooms]
    gen = {}
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        ims = pipe(prompts, num_inference_steps=steps, generator=g, output_type="np").images
        gen[s] = [(im * 255).round().astype(np.uint8) for im in ims]
    tile, pad, label_w, head = 64 * scale, 4, 96, 16
    cols = len(zooms) * (1 + len(seeds))
    canvas = Image.new("RGB", (label_w + cols * (tile + pad), head + len(photos) * (tile + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for zi, z in enumerate(zooms):
        x = label_w + zi * (1 + len(seeds)) * (tile + pad)
        draw.text((x, 2), f"{z}: real | " + " | ".join(f"seed {s}" for s in seeds), fill="black")
    for pi, p in enumerate(photos):
        y = head + pi * (tile + pad)
        draw.text((4, y + tile // 2 - 6), p, fill="black")
        for zi, z in enumerate(zooms):
            row = [data.center(p, z)] + [gen[s][pi * len(zooms) + zi] for s in seeds]
            for k, a in enumerate(row):
                x = label_w + (zi * (1 + len(seeds)) + k) * (tile + pad)
                canvas.paste(Image.fromarray(a).resize((tile, tile), Image.NEAREST), (x, y))
    canvas.save(out / "samples.png", optimize=True)
    (out / "samples.json").write_text(json.dumps({
        "rows": photos, "column_groups": zooms, "per_group": ["real central crop", *[f"seed {s}" for s in seeds]],
        "num_inference_steps": steps, "guidance_scale": 1.0,
    }, indent=1))  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_loop.add_arguments(ap, steps=800, batch_size=8, lr=1e-3, shift=2.0)
    ap.add_argument("--photos", default=None, help="comma-separated subset of the photos (default: all)")
    args = ap.parse_args(argv)
    train_loop.check_arguments(ap, args)

    from cat_pruning.photos.data import PhotoCrops  # needs scikit-image: training only

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY if args.tiny_config else FULL)
    dev = torch.device(args.device)
    data = PhotoCrops(photos=args.photos.split(",") if args.photos else None)

    transformer, text_encoder = build_models(cfg)
    models = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    tok = text_encoder.tokenizer
    h = w = data.size
    img_ids = image_ids(h // PATCH, w // PATCH, dev)
    txt_ids = torch.zeros(cfg["max_length"], 3, device=dev)

    def step_loss(models: torch.nn.ModuleDict, step: int) -> torch.Tensor:
        # Everything random in this step from (seed, step): a resumed run draws what an uninterrupted one would.
        x0, caps = data.sample(np.random.default_rng([args.seed, step]), args.batch_size)
        ids, x0, noise, sigma, xt = train_loop.noised(args, step, pack(torch.from_numpy(x0)), caps, tok, dev)
        with train_loop.autocast(args):
            hidden, pooled = models["text_encoder"](ids["input_ids"], ids["attention_mask"])
            pred = models["transformer"](hidden_states=xt, timestep=sigma, encoder_hidden_states=hidden,
                                         pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids,
                                         return_dict=False)[0]  # fmt: skip
        return torch.nn.functional.mse_loss(pred.float(), noise - x0)

    def save(out: Path, ema: torch.nn.ModuleDict) -> PhotoFluxPipeline:
        return save_pipeline(out, ema["transformer"], ema["text_encoder"], args.shift)

    pipe, _ = train_loop.train(args, train_loop.cli_argv(argv), "tools/train_photo_model.py", cfg, models,
                               step_loss, save)
    if not args.no_samples:
        write_samples(pipe, data, args.out, args.sample_steps)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
