#!/usr/bin/env python
"""Train the tiny pixel-space text-to-image model (cat_pruning.tiny) with rectified flow.

SD3 conventions (FlowMatchEulerDiscreteScheduler): x_t = (1 - sigma) * x0 + sigma * noise,
target = noise - x0, timestep = sigma * 1000, sigma ~ logit-normal(0, 1). Captions are dropped
(replaced by "") with probability --caption-dropout for classifier-free guidance. Data are
procedural scenes (cat_pruning.tiny.scenes), drawn fresh for every step from the seed.

    python tools/train_tiny_t2i.py --out DIR [--steps N --batch-size B --tiny-config]

The shipped weights (cat_pruning/tiny/weights: 64x64 RGB, patch 2 = 1024 image tokens) are

    python tools/train_tiny_t2i.py --out DIR --steps 4200 --cosine --bf16 --max-minutes 57

which ran all 4200 steps in 53 minutes on 2 cores of an Intel Xeon with AMX (bf16 autocast;
without AMX, leave out --bf16 and expect about 1.3x longer).

Writes to DIR a diffusers pipeline (model_index.json, transformer/, text_encoder/, scheduler/,
with the EMA weights), train_log.csv (step, loss, lr, elapsed), train_summary.json and
samples.png (+ samples.json with the prompts).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
from pathlib import Path

try:
    import cat_pruning.tiny  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_loop  # noqa: E402  (the learning-rate schedule and rectified-flow batch all three trainings share)
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cat_pruning.tiny.pipeline import TinyT2IPipeline, image_grid
from cat_pruning.tiny.scenes import IMAGE_SIZE, VOCAB, make_batch
from cat_pruning.tiny.text import TinyTextEncoder

SAMPLE_PROMPTS = [
    "a red circle on a yellow background",
    "a blue square on a white background",
    "a green triangle on a black background",
    "a yellow bar on a purple background",
    "a red circle above a blue square on a yellow background",
    "a white triangle left of an orange circle on a green background",
    "a purple square below a green bar on a white background",
    "a blue circle and a red triangle and a yellow square on a black background",
    "an orange circle on a blue to white gradient",
    "a black square right of a white circle on a red background",
]

FULL = dict(layers=4, heads=4, head_dim=32, patch=2, text_dim=128, text_layers=2, max_length=20)
TINY = dict(layers=1, heads=2, head_dim=16, patch=8, text_dim=32, text_layers=1, max_length=20)


def build_models(c: dict) -> tuple[SD3Transformer2DModel, TinyTextEncoder]:
    inner = c["heads"] * c["head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=c["patch"],
        in_channels=3,
        out_channels=3,
        num_layers=c["layers"],
        attention_head_dim=c["head_dim"],
        num_attention_heads=c["heads"],
        joint_attention_dim=c["text_dim"],
        caption_projection_dim=inner,
        pooled_projection_dim=c["text_dim"],
        pos_embed_max_size=IMAGE_SIZE // c["patch"],
    )
    text_encoder = TinyTextEncoder(
        vocab=list(VOCAB),
        max_length=c["max_length"],
        dim=c["text_dim"],
        num_layers=c["text_layers"],
        num_heads=max(1, c["text_dim"] // 32),
        joint_attention_dim=c["text_dim"],
        pooled_projection_dim=c["text_dim"],
    )
    return transformer, text_encoder


def save_pipeline(out: Path, transformer, text_encoder, shift: float) -> TinyT2IPipeline:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = TinyT2IPipeline(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
    pipe.save_pretrained(str(out))
    return pipe


def write_samples(pipe: TinyT2IPipeline, out: Path, steps: int, guidance: float, seeds=(0, 1)) -> None:
    pipe.set_progress_bar_config(disable=True)
    images = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        images += list(
            pipe(
                SAMPLE_PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np"
            ).images
        )
    Image.fromarray(image_grid(images, cols=len(SAMPLE_PROMPTS))).save(out / "samples.png")
    (out / "samples.json").write_text(
        json.dumps(
            {
                "columns": SAMPLE_PROMPTS,
                "rows_seeds": list(seeds),
                "num_inference_steps": steps,
                "guidance_scale": guidance,
            },
            indent=1,
        )
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--cosine", action="store_true", help="cosine decay to 10%% instead of a constant lr")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema-decay", type=float, default=0.998)
    ap.add_argument("--shift", type=float, default=2.0, help="scheduler shift saved with the pipeline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop early after this wall time (0: no limit)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--sample-steps", type=int, default=24)
    ap.add_argument("--sample-guidance", type=float, default=4.0)
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--tiny-config", action="store_true", help="a very small model (for tests)")
    ap.add_argument("--patch-size", type=int, default=None,
                    help="override the patch size (64x64 pixels: 2 -> 1024 image tokens, 4 -> 256)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for the forward pass (weights, optimizer and EMA stay fp32); "
                         "1.3x faster on a CPU with AMX")
    ap.add_argument("--device", default="cpu", help="where to train, e.g. cuda (the data are made on the CPU)")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY if args.tiny_config else FULL)
    if args.patch_size:
        cfg["patch"] = args.patch_size
    dev = torch.device(args.device)

    transformer, text_encoder = build_models(cfg)
    models = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder}).to(dev).train()
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    decay, no_decay = [], []
    for p in models.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
    )
    gen = torch.Generator().manual_seed(args.seed)
    tok = text_encoder.tokenizer

    log_f = open(out / "train_log.csv", "w", newline="")
    log = csv.writer(log_f)
    log.writerow(["step", "loss", "lr", "elapsed_s"])
    t0 = time.time()
    running, n_run, step = 0.0, 0, 0
    bar = tqdm(range(args.steps), desc="train", mininterval=5, dynamic_ncols=True)
    for step in bar:
        lr = train_loop.lr_at(step, args.steps, args.lr, args.warmup, args.cosine)
        for g in opt.param_groups:
            g["lr"] = lr
        seeds = np.arange(args.batch_size) + (args.seed * 1_000_003 + step) * args.batch_size
        x0, caps = make_batch(seeds)
        # one generator for the whole run (the shipped weights were trained so)
        ids, x0, noise, sigma, xt = train_loop.noise_batch(gen, torch.from_numpy(x0), caps, args.caption_dropout, tok,
                                                           dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            hidden, pooled = text_encoder(ids["input_ids"], ids["attention_mask"])
            pred = transformer(
                hidden_states=xt,
                timestep=sigma * 1000,
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), models.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)

        running += loss.item()
        n_run += 1
        out_of_time = bool(args.max_minutes) and time.time() - t0 > args.max_minutes * 60
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or out_of_time:
            avg = running / n_run
            log.writerow([step + 1, f"{avg:.5f}", f"{lr:.3e}", f"{time.time() - t0:.1f}"])
            log_f.flush()
            bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.1e}")
            running, n_run = 0.0, 0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_pipeline(out, ema["transformer"], ema["text_encoder"], args.shift)
        if out_of_time:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached "
                  + ("" if args.cosine else f"(--steps {step + 1} reproduces this run)"), flush=True)
            break
    bar.close()
    log_f.close()
    steps_done = step + 1
    train_s = time.time() - t0

    pipe = save_pipeline(out, ema["transformer"], ema["text_encoder"], args.shift)
    with open(out / "train_log.csv") as f:
        last = list(csv.reader(f))[-1]
    summary = {
        "model": cfg,
        "params": n_params,
        "args": {k: str(v) for k, v in vars(args).items()},
        "steps_done": steps_done,
        "train_seconds": round(train_s, 1),
        "final_logged_loss": float(last[1]),
        "torch": torch.__version__,
        "threads": args.threads,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    if not args.no_samples:
        write_samples(pipe, out, args.sample_steps, args.sample_guidance)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
