#!/usr/bin/env python
"""Train the video model (cat_pruning.video): a pixel-space diffusers WanTransformer3DModel on
procedural clips (cat_pruning.video.clips: coloured shapes moving or growing over static
textures, 8 frames of 32x32 pixels, 2048 tokens of 1x2x2 pixels), with rectified flow.

The photo model's training loop (tools/train_loop.py: AdamW, the learning-rate schedule, the EMA,
checkpoints, resume): x_t = (1 - sigma) * x0 + sigma * noise, target = noise - x0, logit-normal
sigma, the timestep given to the transformer as 1000 * sigma (Wan's scale). Captions are dropped
with --caption-dropout so that the pipeline can run classifier-free guidance.

    python tools/train_video_model.py --out DIR [--steps N --batch-size B --tiny-config]

Reproducible: every step's clips, noise, timesteps and caption dropout come from generators
seeded by (--seed, step), so a resumed run (--resume) continues exactly as an uninterrupted one.
The shipped weights were trained with the command in cat_pruning/video/weights/train_summary.json.

Writes to DIR: a diffusers pipeline (model_index.json, transformer/, text_encoder/, scheduler/;
safetensors, the EMA weights), train_log.csv, checkpoint.pt (not shipped), train_summary.json and
samples.png (+ samples.json): per held-out caption, a clip drawn for it and generated frames.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import cat_pruning.video  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_loop  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cat_pruning.tiny.text import TinyTextEncoder  # noqa: E402
from cat_pruning.video.clips import EVAL_SEED, VOCAB, batch, random_clip, render  # noqa: E402
from cat_pruning.video.pipeline import TinyWanPipeline  # noqa: E402

# head_dim 16: Wan's 3D rotary gives 8 channels to the frame axis and 4 to each of row and col
FULL = dict(layers=4, heads=4, head_dim=16, ffn=256, freq_dim=64, text_dim=64, text_layers=2, max_length=16)
TINY = dict(layers=1, heads=2, head_dim=12, ffn=32, freq_dim=16, text_dim=16, text_layers=1, max_length=16)


def build_models(c: dict) -> tuple[WanTransformer3DModel, TinyTextEncoder]:
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=c["heads"], attention_head_dim=c["head_dim"], in_channels=3,
        out_channels=3, text_dim=c["text_dim"], freq_dim=c["freq_dim"], ffn_dim=c["ffn"], num_layers=c["layers"],
        rope_max_seq_len=64,
    )
    return transformer, train_loop.text_encoder(VOCAB, c)


def save_pipeline(out: Path, transformer, text_encoder, shift: float) -> TinyWanPipeline:
    return train_loop.save_pipeline(TinyWanPipeline, out, transformer, text_encoder, shift)


def write_samples(pipe: TinyWanPipeline, out: Path, steps: int, rows: int = 6, scale: int = 3) -> None:
    """samples.png: per held-out caption (clips the training never draws), the clip drawn for it,
    then the model's clip for that caption (seed 0), frame by frame. samples.json says what is where."""
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(EVAL_SEED)
    clips = [random_clip(rng) for _ in range(rows)]
    made = pipe([c.caption for c in clips], num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0)).frames  # (rows, F, H, W, 3)
    tile, pad, head = 32 * scale, 4, 14
    frames = made.shape[1]
    canvas = Image.new("RGB", (frames * (tile + pad), rows * (2 * tile + pad + head)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, clip in enumerate(clips):
        y = r * (2 * tile + pad + head)
        draw.text((2, y), f"{clip.caption}: drawn (top), generated (bottom)", fill="black")
        for k, video in enumerate((render(clip), made[r])):
            for f in range(frames):
                a = (np.asarray(video[f]) * 255).round().astype(np.uint8)
                canvas.paste(Image.fromarray(a).resize((tile, tile), Image.NEAREST),
                             (f * (tile + pad), y + head + k * tile))
    canvas.save(out / "samples.png", optimize=True)
    (out / "samples.json").write_text(json.dumps({
        "rows": [c.caption for c in clips], "per_row": ["a clip drawn for the caption", "generated, seed 0"],
        "num_inference_steps": steps, "guidance_scale": 4.0,
    }, indent=1))  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_loop.add_arguments(ap, steps=3000, batch_size=4, lr=1e-3, shift=3.0, save_every=100)
    args = ap.parse_args(argv)
    train_loop.check_arguments(ap, args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY if args.tiny_config else FULL)
    dev = torch.device(args.device)
    transformer, text_encoder = build_models(cfg)
    models = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    tok = text_encoder.tokenizer

    def step_loss(models: torch.nn.ModuleDict, step: int) -> torch.Tensor:
        # Everything random in this step from (seed, step): a resumed run draws what an uninterrupted one would.
        x0, caps = batch(np.random.default_rng([args.seed, step]), args.batch_size)
        ids, x0, noise, sigma, xt = train_loop.noised(args, step, torch.from_numpy(x0), caps, tok, dev)
        with train_loop.autocast(args):
            hidden, _ = models["text_encoder"](ids["input_ids"], ids["attention_mask"])
            pred = models["transformer"](hidden_states=xt, timestep=1000 * sigma, encoder_hidden_states=hidden,
                                         return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), noise - x0)

    def save(out: Path, ema: torch.nn.ModuleDict) -> TinyWanPipeline:
        return save_pipeline(out, ema["transformer"], ema["text_encoder"], args.shift)

    pipe, _ = train_loop.train(args, train_loop.cli_argv(argv), "tools/train_video_model.py", cfg, models,
                               step_loss, save)
    if not args.no_samples:
        write_samples(pipe, args.out, args.sample_steps)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
