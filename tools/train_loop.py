"""The training loop the photo and video models share (tools/train_photo_model.py,
tools/train_video_model.py): AdamW with the scene model's learning-rate schedule, an EMA of the
weights, rectified-flow losses computed by the caller, checkpoints to resume from, a CSV log, and
a summary with the command that reproduces the run.

Reproducible: the caller draws everything random in a step from (seed, step), so a run resumed
from OUT/checkpoint.pt (--resume; written every --save-every steps and when --max-minutes stops
it) continues exactly as an uninterrupted one would, with the same number of threads.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def lr_at(step: int, total: int, base: float, warmup: int, cosine: bool) -> float:
    """Linear warmup, then constant (default: the weights after N steps do not depend on
    --steps, so a run cut short by --max-minutes is reproduced by --steps N) or cosine to 10%."""
    if step < warmup:
        return base * (step + 1) / warmup
    if not cosine:
        return base
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def add_arguments(ap: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float, shift: float,
                  save_every: int = 50) -> None:
    """The options every training script takes (its own defaults for the first four)."""
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--cosine", action="store_true", help="cosine decay to 10%% instead of a constant lr")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--shift", type=float, default=shift, help="scheduler shift saved with the pipeline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="stop after this wall time (0: no limit), with a checkpoint to --resume from")
    ap.add_argument("--stop-at", type=int, default=0,
                    help="stop after this many steps, the schedule still spanning --steps (0: at --steps); "
                         "reproduces a run that --max-minutes stopped")
    ap.add_argument("--save-every", type=int, default=save_every, help="checkpoint + pipeline every N steps")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from the weights of a saved pipeline (e.g. the shipped one) instead of at random; "
                         "its train_summary.json is kept in this run's summary")
    ap.add_argument("--sample-steps", type=int, default=28)
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--tiny-config", action="store_true", help="a very small model (for tests)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for the forward pass (weights, optimizer and EMA stay fp32)")
    ap.add_argument("--device", default="cpu", help="where to train, e.g. cuda (the data are made on the CPU)")


def check_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")


def reproduce_command(script: str, argv: list[str], steps_done: int) -> str:
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
    return f"python {script} " + shlex.join([*out, "--stop-at", str(steps_done)])


def train(args: argparse.Namespace, argv: list[str], script: str, cfg: dict, models: torch.nn.ModuleDict,
          step_loss: Callable[[torch.nn.ModuleDict, int], torch.Tensor],
          save: Callable[[Path, torch.nn.ModuleDict], Any]) -> tuple[Any, dict]:
    """Train `models` (on args.device) for args.steps steps, step_loss(models, step) giving each
    step's loss (its randomness drawn from (args.seed, step)); save(out, ema) writes the pipeline
    of the EMA weights. Returns (the saved pipeline, the summary written to train_summary.json)."""
    dev = torch.device(args.device)
    out: Path = args.out
    init_summary = init_weights(models, args.init_from) if args.init_from else None
    models = models.to(dev).train()
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
        save(out, ema)

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
        loss = step_loss(models, step)  # (the caller's forward runs under autocast(args) with --bf16)
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

    pipe = save(out, ema)
    with open(log_path) as f:
        last = list(csv.reader(f))[-1]
    summary = {
        "model": cfg,
        "params": n_params,
        "command": f"python {script} " + shlex.join(argv),
        "reproduce": reproduce_command(script, argv, steps_done),
        "args": {k: str(v) for k, v in vars(args).items()},
        "steps_done": steps_done,
        "finished": steps_done >= args.steps and not stopped_early,
        "train_seconds": round(train_s, 1),
        "final_logged_loss": float(last[1]) if last[0] != "step" else None,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    if init_summary is not None:
        summary["init_from"] = {"path": str(args.init_from), "summary": init_summary}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return pipe, summary


def init_weights(models: torch.nn.ModuleDict, pipeline_dir: Path) -> dict | None:
    """Load each model's weights from `pipeline_dir`/<name>/ (a pipeline saved by save_pipeline);
    every tensor must match by name and shape. Returns that pipeline's train_summary.json, if any."""
    from safetensors.torch import load_file

    for name, model in models.items():
        path = pipeline_dir / name / "diffusion_pytorch_model.safetensors"
        if not path.is_file():
            raise SystemExit(f"train: --init-from {pipeline_dir} has no {path.relative_to(pipeline_dir)}")
        try:
            model.load_state_dict(load_file(str(path)))
        except RuntimeError as e:
            raise SystemExit(f"train: --init-from {pipeline_dir}: {name} does not match this model config: {e}") from e
    summary = pipeline_dir / "train_summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def cli_argv(argv: list[str] | None) -> list[str]:
    return argv if argv is not None else sys.argv[1:]


def text_encoder(vocab: list[str], c: dict) -> Any:
    """The shipped models' small word-level text encoder for a model config `c` (its text_dim,
    text_layers and max_length)."""
    from cat_pruning.tiny.text import TinyTextEncoder

    return TinyTextEncoder(vocab=list(vocab), max_length=c["max_length"], dim=c["text_dim"],
                           num_layers=c["text_layers"], num_heads=max(1, c["text_dim"] // 32),
                           joint_attention_dim=c["text_dim"], pooled_projection_dim=c["text_dim"])  # fmt: skip


def save_pipeline(pipeline_cls: type, out: Path, transformer: Any, text_encoder: Any, shift: float) -> Any:
    """A pipeline of `pipeline_cls` around the models with a flow-matching Euler scheduler of
    `shift`, saved to `out` (safetensors); returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = pipeline_cls(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
    pipe.save_pretrained(str(out))
    return pipe


def noised(args: argparse.Namespace, step: int, x0: torch.Tensor, captions: list[str], tokenizer: Any,
           device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's rectified-flow batch (noise_batch) with everything random drawn from (args.seed, step)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return noise_batch(gen, x0, captions, args.caption_dropout, tokenizer, device)


def noise_batch(gen: torch.Generator, x0: torch.Tensor, captions: list[str], caption_dropout: float, tokenizer: Any,
                device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rectified-flow batch from clean samples x0 (B, ...) and their captions, everything random
    drawn from `gen` in this order: captions dropped with probability `caption_dropout`, noise, a
    logit-normal sigma per sample; x_t = (1 - sigma) x0 + sigma noise. Returns (token ids, x0,
    noise, sigma, x_t) on `device`; the target is noise - x0."""
    drop = torch.rand(len(captions), generator=gen) < caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
    ids = {k: v.to(device) for k, v in tokenizer(captions).items()}
    noise = torch.randn(x0.shape, generator=gen).to(device)
    sigma = torch.sigmoid(torch.randn(len(captions), generator=gen)).to(device)  # logit-normal(0, 1)
    x0 = x0.to(device)
    s = sigma.view(-1, *[1] * (x0.dim() - 1))
    return ids, x0, noise, sigma, (1 - s) * x0 + s * noise


def autocast(args: argparse.Namespace) -> torch.autocast:
    """bf16 autocast of a forward pass with --bf16 (weights, optimizer and EMA stay fp32)."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)
