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
import copy
import csv
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import cat_pruning.photos  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tqdm import tqdm  # noqa: E402
from train_tiny_t2i import lr_at  # noqa: E402  (the scene model's schedule: warmup, constant or cosine)

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


def save_pipeline(out: Path, transformer, text_encoder, shift: float) -> PhotoFluxPipeline:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = PhotoFluxPipeline(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
    pipe.save_pretrained(str(out))  # safetensors
    return pipe


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


def reproduce_command(argv: list[str], steps_done: int) -> str:
    """The command that trains the same weights without a wall-clock limit or a resume: the same
    arguments with --max-minutes and --resume dropped and --stop-at set to the steps done."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=")[0]
        if name in ("--max-minutes", "--stop-at") and "=" not in a:
            skip = True
        if name in ("--max-minutes", "--stop-at", "--resume"):
            continue
        out.append(a)
    return "python tools/train_photo_model.py " + shlex.join([*out, "--stop-at", str(steps_done)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--cosine", action="store_true", help="cosine decay to 10%% instead of a constant lr")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--shift", type=float, default=2.0, help="scheduler shift saved with the pipeline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop after this wall time (0: no limit), with a checkpoint to --resume from")
    ap.add_argument("--stop-at", type=int, default=0,
                    help="stop after this many steps, the schedule still spanning --steps (0: at --steps); "
                         "reproduces a run that --max-minutes stopped")
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint + pipeline every N steps")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    ap.add_argument("--sample-steps", type=int, default=28)
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--tiny-config", action="store_true", help="a very small model (for tests)")
    ap.add_argument("--photos", default=None, help="comma-separated subset of the photos (default: all)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for the forward pass (weights, optimizer and EMA stay fp32)")
    ap.add_argument("--device", default="cpu", help="where to train, e.g. cuda (the crops are made on the CPU)")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    from cat_pruning.photos.data import PhotoCrops  # needs scikit-image: training only

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY if args.tiny_config else FULL)
    dev = torch.device(args.device)
    data = PhotoCrops(photos=args.photos.split(",") if args.photos else None)

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
    tok = text_encoder.tokenizer
    h = w = data.size
    img_ids = image_ids(h // PATCH, w // PATCH, dev)
    txt_ids = torch.zeros(cfg["max_length"], 3, device=dev)

    ckpt_path = out / "checkpoint.pt"
    start, prior_s = 0, 0.0
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        if ck["model"] != cfg:
            raise SystemExit(f"train: {ckpt_path} is a {ck['model']} model, not {cfg}")
        models.load_state_dict(ck["models"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        start, prior_s = ck["step"], ck["train_seconds"]
        print(f"resuming from {ckpt_path} at step {start} ({prior_s / 60:.1f} min trained)", flush=True)
    log_path = out / "train_log.csv"
    if start == 0 or not log_path.is_file():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "loss", "lr", "elapsed_s"])
    else:  # drop rows logged after the checkpoint (a run killed between two checkpoints)
        with open(log_path) as f:
            rows = list(csv.reader(f))
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= start])
    log_f = open(log_path, "a", newline="")
    log = csv.writer(log_f)

    def checkpoint(step: int, elapsed: float) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(dict(model=cfg, models=models.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                        step=step, train_seconds=elapsed, args=vars(args) | {"out": str(out)}), tmp)  # fmt: skip
        os.replace(tmp, ckpt_path)
        save_pipeline(out, ema["transformer"], ema["text_encoder"], args.shift)

    t0 = time.time()
    running, n_run, step = 0.0, 0, start
    stopped_early = False
    end = min(args.steps, args.stop_at or args.steps)
    bar = tqdm(range(start, end), desc="train", mininterval=5, dynamic_ncols=True, initial=start,
               total=end)  # fmt: skip
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.cosine)
        for g in opt.param_groups:
            g["lr"] = lr
        # Everything random in this step from (seed, step): a resumed run draws what an uninterrupted one would.
        x0, caps = data.sample(np.random.default_rng([args.seed, step]), args.batch_size)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x0 = pack(torch.from_numpy(x0))
        drop = torch.rand(len(caps), generator=gen) < args.caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist(), strict=True)]
        ids = {k: v.to(dev) for k, v in tok(caps).items()}
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        sigma = torch.sigmoid(torch.randn(len(caps), generator=gen)).to(dev)  # logit-normal(0, 1)
        x0 = x0.to(dev)
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            hidden, pooled = text_encoder(ids["input_ids"], ids["attention_mask"])
            pred = transformer(hidden_states=xt, timestep=sigma, encoder_hidden_states=hidden,
                               pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids,
                               return_dict=False)[0]  # fmt: skip
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
        elapsed = prior_s + time.time() - t0
        out_of_time = bool(args.max_minutes) and time.time() - t0 > args.max_minutes * 60
        if (step + 1) % args.log_every == 0 or step + 1 == end or out_of_time:
            avg = running / n_run
            log.writerow([step + 1, f"{avg:.5f}", f"{lr:.3e}", f"{elapsed:.1f}"])
            log_f.flush()
            bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.1e}")
            running, n_run = 0.0, 0
        if out_of_time or (args.save_every and (step + 1) % args.save_every == 0 and step + 1 < end):
            checkpoint(step + 1, elapsed)
        if out_of_time:
            stopped_early = True
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached; --resume continues "
                  f"it, --stop-at {step + 1} reproduces it", flush=True)  # fmt: skip
            break
    bar.close()
    log_f.close()
    steps_done = step + 1 if end > start else start
    train_s = prior_s + time.time() - t0
    checkpoint(steps_done, train_s)

    pipe = save_pipeline(out, ema["transformer"], ema["text_encoder"], args.shift)
    with open(log_path) as f:
        last = list(csv.reader(f))[-1]
    summary = {
        "model": cfg,
        "params": n_params,
        "command": "python tools/train_photo_model.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "reproduce": reproduce_command(argv if argv is not None else sys.argv[1:], steps_done),
        "args": {k: str(v) for k, v in vars(args).items()},
        "steps_done": steps_done,
        "finished": steps_done >= args.steps and not stopped_early,
        "train_seconds": round(train_s, 1),
        "final_logged_loss": float(last[1]) if last[0] != "step" else None,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    if not args.no_samples:
        write_samples(pipe, data, out, args.sample_steps)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
