"""Command line: python -m cat_pruning demo, python -m cat_pruning generate.

demo       generates a handful of prompts with one of the shipped models (--model tiny, the scene
           model, photos, the Flux-architecture photo model, or video, the Wan-architecture video
           model), dense and with CAT, and writes one PNG per prompt (dense | CAT | how often each
           token was recomputed; for video an animated GIF of those, frame by frame, and a PNG of
           its frames), with wall time, speedup, MAC fraction and PSNR/SSIM against dense.
generate   one prompt (--prompt) or a file of them (--prompts-file) with a shipped model or any
           supported diffusers pipeline saved on disk, and (with CAT) a picture of how often each
           token was recomputed. For DiT, which is class-conditional, the prompt is an ImageNet
           class name ("golden retriever"); for the photo model it is "<photo>, <zoom>"
           ("coffee, close-up"). Under torchrun (or accelerate launch) a prompts file is shared
           out over the processes, one pipeline each (see: generate --help).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import OUTPUT_CACHES, CATConfig

DEMO_PROMPTS = [
    "a red circle above a blue square on a yellow background",
    "a green triangle left of a white circle on a black background",
    "a blue square on a red to yellow gradient background",
    "a yellow circle below a purple triangle on a green background",
    "a white square right of an orange circle on a blue background",
    "a black triangle on a white background",
]
PHOTO_DEMO_PROMPTS = [
    "coffee, full view",
    "astronaut, medium",
    "chelsea, close-up",
    "brick, medium",
    "hubble, full view",
    "gravel, close-up",
]
VIDEO_DEMO_PROMPTS = [
    "a red circle moving left over blue stripes",
    "a green square growing over white checks",
    "a yellow triangle moving up and a purple circle shrinking over orange dots",
    "a white circle moving down over green waves",
    "a blue square shrinking over red stripes",
    "an orange triangle moving right over cyan checks",
]
# --model names of the shipped models
SHIPPED = {"tiny": "shipped tiny model", "photos": "shipped photo model", "video": "shipped video model"}


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _bounded(parse, ok, bound: str):
    """An argparse type: `parse` the text, then require `ok(value)` ("must <bound>, got ...")."""

    def convert(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must {bound}, got {value}")
        return value

    return convert


_positive_int = _bounded(_int, lambda v: v >= 1, "be >= 1")
_non_negative_int = _bounded(_int, lambda v: v >= 0, "be >= 0")
_full_steps = _bounded(_int, lambda v: v >= 2, "be >= 2")
_ratio = _bounded(_float, lambda v: 0.0 < v <= 1.0, "lie in (0, 1]")
_guidance = _bounded(_float, lambda v: v >= 0, "be >= 0")


def _config(args: argparse.Namespace) -> CATConfig:
    """The CATConfig of a command: patch()'s defaults (or, with --paper, the paper's CAT) and the flags given."""
    base = CATConfig.paper() if args.paper else CATConfig()
    given = {k: getattr(args, k) for k in ("keep_ratio", "full_steps", "refresh_every", "forecast", "output_cache")
             if getattr(args, k) is not None}
    return base.replace(backend=args.backend, **given)


def _describe(cfg: CATConfig) -> str:
    return (f"keep_ratio {cfg.keep_ratio}, full_steps {cfg.full_steps}, refresh_every {cfg.refresh_every}, "
            f"forecast {cfg.forecast}, output_cache {cfg.output_cache}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cat_pruning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, steps: int | None, guidance: float | None) -> None:
        own = "the pipeline's own default"
        d, paper = CATConfig(), CATConfig.paper()
        p.add_argument("--keep-ratio", type=_ratio, default=None,
                       help=f"share of tokens recomputed per pruned step (default {d.keep_ratio}; "
                            f"--paper {paper.keep_ratio})")
        p.add_argument("--full-steps", type=_full_steps, default=None,
                       help=f"dense steps first (default {d.full_steps})")
        p.add_argument("--refresh-every", type=_non_negative_int, default=None,
                       help=f"every N-th step recomputes all tokens; 0 never, only with --forecast none "
                            f"(default {d.refresh_every}; --paper 0)")
        p.add_argument("--forecast", choices=["taylor", "none"], default=None,
                       help=f"read skipped tokens as a forecast or reuse them (default {d.forecast}; --paper none)")
        p.add_argument("--output-cache", choices=list(OUTPUT_CACHES), default=None,
                       help=f"what the per-token output cache holds: the last block's hidden state or the "
                            f"model's prediction (default {d.output_cache}: hidden, noise on a per-token timestep; "
                            f"--paper noise)")
        p.add_argument("--paper", action="store_true", help="start from the paper's CAT (CATConfig.paper())")
        p.add_argument("--steps", type=_positive_int, default=steps, help=f"denoising steps (default {steps or own})")
        p.add_argument("--guidance", type=_guidance, default=guidance,
                       help=f"CFG scale (default {guidance or own}; on a model without guidance distillation whose "
                            "pipeline has true CFG, e.g. Qwen-Image: true_cfg_scale, with the negative prompt ' ')")
        p.add_argument("--seed", type=_int, default=0, help="seed (default 0)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        p.add_argument("--device", default=device,
                       help=f"torch device to run on: cpu, cuda or cuda:N (default {device} on this machine)")
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                       help="default float32 on cpu, bfloat16 on cuda")
        p.add_argument("--backend", choices=["auto", "triton", "cuda", "torch"], default="auto",
                       help="kernels of CAT's token selection and caches: triton, cuda (the compiled extension), "
                            "torch (plain PyTorch, any device) or auto (default: triton on CUDA if it imports, "
                            "else the extension, else torch)")

    demo = sub.add_parser("demo", help="dense vs CAT on a shipped model, PNGs and a table")
    common(demo, 28, None)
    demo.add_argument("--model", choices=sorted(SHIPPED), default="tiny",
                      help="tiny (the scene model, SD3 architecture; default), photos (Flux architecture) or video "
                           "(Wan architecture: an animated GIF per prompt)")
    demo.add_argument("--prompts", type=_positive_int, default=4, help=f"how many (1..{len(DEMO_PROMPTS)})")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")

    gen = sub.add_parser("generate", help="one prompt or a file of them (data-parallel under torchrun), "
                                          "with CAT unless --dense",
                         description=inspect.cleandoc(generate.__doc__),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    common(gen, None, None)
    gen.add_argument("--model", default="tiny",
                     help="'tiny' (the shipped scene model), 'photos' (the shipped photo model) or a pipeline folder "
                          "(of pictures: the video model runs in demo --model video)")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text (for DiT: an ImageNet class name)")
    what.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                      help="one prompt a line (blank lines and lines starting with '#' skipped); prompt i (from 0) "
                           "is seeded --seed + i and written as NNNN-<prompt>-seed<S>-<settings>.png")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace pictures that exist already (without it, an existing file is an error and nothing "
                          "is generated)")
    gen.add_argument("--height", type=_positive_int, default=None,
                     help="pixels (default: the pipeline's); the shipped models take multiples of 2, the tiny model "
                          "at most 64")
    gen.add_argument("--width", type=_positive_int, default=None, help="pixels (default: the pipeline's); as --height")
    gen.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out)")
    gen.add_argument("--dense", action="store_true", help="run the unpatched model")
    return parser


def _dtype(args: argparse.Namespace) -> torch.dtype:
    name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return getattr(torch, name)


def _check_device(args: argparse.Namespace) -> None:
    """Fail before anything loads: a device torch does not know or cannot use, or a kernel
    backend that cannot run there (otherwise it would fail at the first pruned step)."""
    from cat_kernels.backend import resolve

    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise SystemExit(f"error: --device {args.device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available on this machine")
    try:
        resolve(device, args.backend)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"error: --backend {args.backend}: {err}") from None


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    """A shipped pipeline ("tiny", "photos"), a folder written by tools/train_tiny_t2i.py or
    tools/train_photo_model.py, or a diffusers pipeline folder whose transformer class cat_pruning
    supports (checked before loading)."""
    from .adapters import ADAPTERS, supported_families
    from .tiny import TinyT2IPipeline, load_tiny_pipeline

    if model == "tiny":
        return load_tiny_pipeline(device=device, dtype=dtype)
    if model == "photos":
        from .photos import load_photo_pipeline

        return load_photo_pipeline(device=device, dtype=dtype)
    if model == "video":
        from .video import load_video_pipeline

        return load_video_pipeline(device=device, dtype=dtype)
    path = Path(model)
    if not path.exists():
        raise SystemExit(f"error: --model {model!r}: no such folder (a local pipeline folder is needed; "
                         "nothing is downloaded)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise SystemExit(f"error: --model {model!r} is not a diffusers pipeline folder (no model_index.json there)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {index_file}: not valid JSON ({err})") from None
    pipeline_class = index.get("_class_name")
    if pipeline_class == TinyT2IPipeline.__name__:
        return load_tiny_pipeline(device=device, dtype=dtype, path=path)
    if pipeline_class == "PhotoFluxPipeline":
        from .photos import load_photo_pipeline

        return load_photo_pipeline(device=device, dtype=dtype, path=path)
    if pipeline_class == "TinyWanPipeline":
        from .video import load_video_pipeline

        return load_video_pipeline(device=device, dtype=dtype, path=path)
    transformer = index.get("transformer")
    if not isinstance(transformer, list) or len(transformer) != 2:
        raise SystemExit(f"error: {pipeline_class} has no transformer; cat_pruning patches diffusion transformers "
                         f"({supported_families()})")
    supported = {name for adapter in ADAPTERS for name in adapter.model_classes}
    if transformer[1] not in supported:
        raise SystemExit(f"error: {pipeline_class}'s transformer {transformer[1]} is not supported; supported: "
                         f"{supported_families()}")
    import warnings

    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # newer diffusers renamed it `dtype`; 0.36 knows only this name
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype).to(device)


def _images(output) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] on the CPU from a pipeline output of any type; a video
    pipeline's (B, 3, F, H, W) frames in "pt" output. (The copies to the host run after the
    generation: no denoising step is running.)"""
    images = output.frames if hasattr(output, "frames") else output.images
    if isinstance(images, torch.Tensor):
        return images.float().cpu()
    arrays = [np.asarray(im, dtype=np.float32) / (255.0 if not isinstance(im, np.ndarray) else 1.0) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _call_kwargs(pipe, prompt: str, args: argparse.Namespace, seed: int | None = None) -> dict:
    """The pipeline call: the prompt (DiT: its class label), the seed (default --seed) and only
    the options that were set."""
    seed = args.seed if seed is None else seed
    kwargs = dict(generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")
    if hasattr(pipe, "get_label_ids"):  # DiTPipeline is class-conditional
        try:
            kwargs["class_labels"] = pipe.get_label_ids([prompt])
        except ValueError as err:
            raise SystemExit(f"error: {type(pipe).__name__} takes an ImageNet class name as the prompt, "
                             f"not {prompt!r}: {err}") from None
    else:
        kwargs["prompt"] = prompt
    accepted = inspect.signature(pipe.__call__).parameters
    guidance_key = "guidance_scale"
    if args.guidance is not None and _true_cfg_only(pipe, accepted):
        guidance_key, kwargs["negative_prompt"] = "true_cfg_scale", " "  # diffusers' recipe: any negative turns it on
    for key, value in (("num_inference_steps", args.steps), (guidance_key, args.guidance),
                       ("height", getattr(args, "height", None)), ("width", getattr(args, "width", None))):
        if value is None:
            continue
        if key not in accepted:
            raise SystemExit(f"error: {type(pipe).__name__} takes no {key} (the option for it was given)")
        kwargs[key] = value
    return kwargs


def _true_cfg_only(pipe, accepted) -> bool:
    """Whether the pipeline's CFG is true CFG (`true_cfg_scale` with a negative prompt) and its
    `guidance_scale` would be ignored: a transformer without a guidance embedding (Qwen-Image,
    Flux.1 schnell)."""
    config = getattr(getattr(pipe, "transformer", None), "config", None) or {}
    return "true_cfg_scale" in accepted and "negative_prompt" in accepted and not config.get("guidance_embeds", True)


def _run(pipe, prompt: str, args: argparse.Namespace, seed: int | None = None) -> tuple[torch.Tensor, float]:
    kwargs = _call_kwargs(pipe, prompt, args, seed)
    t0 = time.perf_counter()
    out = pipe(**kwargs)
    if str(args.device).startswith("cuda"):
        torch.cuda.synchronize()
    return _images(out), time.perf_counter() - t0


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


_STOPS = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float32)
_GAMMA = 0.5  # the colour of count c sits at ((c - lo) / (hi - lo)) ** _GAMMA: one or two extra steps stay visible


def _colours(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on a dark-blue (0) to yellow (1) ramp."""
    t = np.clip(t, 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_STOPS) - 2)
    frac = (t - lo)[..., None]
    return (_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).round().astype(np.uint8)


def _position(count: np.ndarray | float, lo: int, hi: int) -> np.ndarray:
    """Where on the colour scale [lo, hi] (0 dark to 1 bright) a count of steps lies."""
    return np.clip((np.asarray(count, np.float32) - lo) / max(hi - lo, 1), 0.0, 1.0) ** _GAMMA


def token_map(counts: torch.Tensor, scale: tuple[int, int], size: tuple[int, int], min_side: int = 256):
    """(h, w) counts of the steps that computed each token -> a PIL picture of them at `size` (H, W)
    pixels (larger by a whole factor until its short side is at least `min_side`), with a colour
    bar labelled in steps. `scale` = (lo, hi) fixes the colours: lo steps darkest, hi brightest,
    the same for every picture of a run (_map_scale), whatever the counts of one picture."""
    from PIL import Image, ImageDraw, ImageFont

    lo, hi = scale
    factor = max(1, math.ceil(min_side / min(size)))
    h, w = size[0] * factor, size[1] * factor
    picture = Image.fromarray(_colours(_position(counts.float().numpy(), lo, hi))).resize((w, h), Image.NEAREST)
    font = ImageFont.load_default()
    bar_w, gap, label_w, caption_h = 14, 8, 8 + int(font.getlength(str(hi))) + 4, 18
    canvas = Image.new("RGB", (w + gap + bar_w + label_w, h + caption_h), "white")
    canvas.paste(picture, (0, 0))
    ramp = _colours(np.linspace(1.0, 0.0, h, dtype=np.float32))[:, None].repeat(bar_w, 1)  # bright at the top
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (w + gap, 0))
    draw = ImageDraw.Draw(canvas)
    ticks: list[tuple[int, int]] = []  # (count, y): hi and lo, then the counts between that fit 14 pixels apart
    for count in [hi, lo, *range(hi - 1, lo, -1)]:
        y = round((1.0 - float(_position(count, lo, hi))) * (h - 1))
        if all(abs(y - other) >= 14 for _, other in ticks):
            ticks.append((count, y))
    for count, y in ticks:
        draw.line([(w + gap + bar_w, y), (w + gap + bar_w + 4, y)], fill="black")
        draw.text((w + gap + bar_w + 7, min(max(y - 6, 0), h - 12)), str(count), fill="black", font=font)
    draw.text((2, h + 3), f"steps computed per token (of {hi})", fill="black", font=font)
    return canvas


def _map_scale(stats) -> tuple[int, int]:
    """The colour scale of a run's token maps: from the steps that computed every token (dense,
    anchor, fill and refresh steps) to all steps. Every image of a run has the same steps, so the
    same colours mean the same counts in every map."""
    steps = len(stats.steps)
    everywhere = sum(s.mode != "pruned" for s in stats.steps)
    return min(everywhere, steps - 1), steps


def _recompute_map(stats, size: tuple[int, int]):
    """(the token map picture, a line that says what it shows) of a CAT generation."""
    counts = stats.recomputed[-1]  # the two halves of a CFG pair share one selection
    if counts.shape[0] == 1 and counts.numel() > 1:  # packed tokens without a grid (Flux): the image's aspect
        rows = round((counts.numel() * size[0] / size[1]) ** 0.5)
        if rows and counts.numel() % rows == 0:
            counts = counts.reshape(rows, -1)
    scale = _map_scale(stats)
    label = (f"steps computed per token: {int(counts.min())} to {int(counts.max())} of {len(stats.steps)} "
             f"(colour bar {scale[0]} to {scale[1]})")
    return token_map(counts, scale, size), label


def _panel(dense: np.ndarray, cat: np.ndarray, heat, heat_label: str, caption: str, scale: int = 4):
    """dense | CAT | the token map (a PIL picture with its colour bar), labelled, one caption line."""
    from PIL import Image, ImageDraw

    tiles = [Image.fromarray(np.repeat(np.repeat(a, scale, 0), scale, 1)) for a in (dense, cat)] + [heat]
    h, w = tiles[0].height, tiles[0].width
    canvas = Image.new("RGB", (2 * (w + 10) + heat.width, max(h, heat.height) + 40), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, ("dense", "CAT", ""), strict=True)):
        canvas.paste(tile, (i * (w + 10), 0))
        if label:
            draw.text((i * (w + 10) + 4, h + 4), label, fill="black")
    draw.text((4, max(h, heat.height) + 4), heat_label[:150], fill="black")
    draw.text((4, max(h, heat.height) + 22), caption[:110], fill="black")
    return canvas


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def demo(args: argparse.Namespace) -> int:
    import cat_pruning

    from .metrics import psnr, ssim

    prompts = {"photos": PHOTO_DEMO_PROMPTS, "video": VIDEO_DEMO_PROMPTS}.get(args.model, DEMO_PROMPTS)
    if args.prompts > len(prompts):
        raise SystemExit(f"error: --prompts must be at most {len(prompts)}")
    pipe = load_pipeline(args.model, args.device, _dtype(args))
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    _run(pipe, prompts[0], args)  # warm-up: first-call allocations and lazy imports,
    config = _config(args)
    with cat_pruning.patched(pipe, config):
        _run(pipe, prompts[0], args)  # and kernel compilation, so prompt 0's speedup is fair
    rows = []
    from tqdm.auto import tqdm

    for i, prompt in enumerate(tqdm(prompts[: args.prompts], desc="demo", unit="prompt")):
        dense, t_dense = _run(pipe, prompt, args)
        with cat_pruning.patched(pipe, config):
            cat, t_cat = _run(pipe, prompt, args)
            stats = cat_pruning.stats(pipe)
        png = args.out / f"{i:02d}.png"
        if dense.dim() == 5:  # video (B, 3, F, H, W): the frames as images
            _video_panels(dense[0], cat[0], stats, prompt, png)
            dense, cat = (x[0].transpose(0, 1) for x in (dense, cat))
        else:
            heat, label = _recompute_map(stats, (4 * dense.shape[-2], 4 * dense.shape[-1]))
            _panel(_to_uint8(dense[0]), _to_uint8(cat[0]), heat, label, prompt).save(png)
        rows.append(dict(prompt=prompt, dense_s=t_dense, cat_s=t_cat, speedup=t_dense / t_cat,
                         mac_fraction=stats.mac_fraction, psnr_db=psnr(cat, dense), ssim=ssim(cat, dense),
                         png=str(png)))
    print(f"\nCAT Pruning demo: {SHIPPED[args.model]}, {args.steps} steps, {_describe(config)}, "
          f"{args.device} {_dtype(args)}".replace("torch.", ""))
    print(f"{'prompt':<62} {'dense s':>8} {'CAT s':>7} {'speedup':>8} {'MACs':>6} {'PSNR dB':>8} {'SSIM':>6}")
    for r in rows:
        print(f"{r['prompt'][:62]:<62} {r['dense_s']:8.2f} {r['cat_s']:7.2f} {r['speedup']:7.2f}x "
              f"{100 * r['mac_fraction']:5.1f}% {r['psnr_db']:8.2f} {r['ssim']:6.3f}")
    (args.out / "demo.json").write_text(json.dumps(rows, indent=1))
    animated = f", {args.out}/NN.gif (the same, frame by frame)" if args.model == "video" else ""
    print(f"pictures: {args.out}/NN.png (dense | CAT | tokens recomputed){animated}; numbers: {args.out}/demo.json")
    return 0


def _video_panels(dense: torch.Tensor, cat: torch.Tensor, stats, caption: str, png: Path) -> None:
    """A clip's (3, F, H, W) dense and CAT frames: NN.gif, dense | CAT | the frame's token map,
    frame by frame (the maps on one colour scale), and NN.png, the same panels one under another."""
    from PIL import Image

    counts = stats.recomputed[-1]  # (F, h, w): steps that computed each token
    scale = _map_scale(stats)
    size = (4 * dense.shape[-2], 4 * dense.shape[-1])
    panels = []
    for f in range(dense.shape[1]):
        heat = token_map(counts[f], scale, size)
        label = (f"frame {f + 1} of {dense.shape[1]}: steps computed per token {int(counts[f].min())} to "
                 f"{int(counts[f].max())} of {len(stats.steps)}")
        panels.append(_panel(_to_uint8(dense[:, f]), _to_uint8(cat[:, f]), heat, label, caption))
    panels[0].save(png.with_suffix(".gif"), save_all=True, append_images=panels[1:], duration=400, loop=0)
    strip = Image.new("RGB", (panels[0].width, sum(p.height for p in panels)), "white")
    for f, panel in enumerate(panels):
        strip.paste(panel, (0, f * panels[0].height))
    strip.save(png)


def read_prompts(path: Path) -> list[str]:
    """The prompts of a --prompts-file, in order: one a line, surrounding whitespace stripped, blank
    lines and lines starting with '#' skipped. A missing, unreadable or empty file is a SystemExit."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SystemExit(f"error: --prompts-file {path}: no such file") from None
    except IsADirectoryError:
        raise SystemExit(f"error: --prompts-file {path} is a folder, not a text file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: --prompts-file {path}: cannot read it as UTF-8 text ({err})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SystemExit(f"error: --prompts-file {path} holds no prompts (blank lines and lines starting with '#' "
                         "are skipped)")
    return prompts


class _Launch(NamedTuple):
    """This process's place in a torchrun / accelerate launch; (0, 1, None) when started on its own."""

    rank: int
    world: int
    local_rank: int | None


def _launch() -> _Launch:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (accelerate launch runs torchrun's launcher)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return _Launch(0, 1, None)

    def number(key: str, default: str | None) -> int:
        text = env.get(key, default)
        if text is None:
            raise SystemExit(f"error: WORLD_SIZE is set but {key} is not: launch with torchrun --nproc_per_node N "
                             "-m cat_pruning generate ...")
        try:
            return int(text)
        except ValueError:
            raise SystemExit(f"error: environment {key}={text!r} is not an integer") from None

    world = number("WORLD_SIZE", None)
    rank = number("RANK", "0" if world == 1 else None)
    local_rank = number("LOCAL_RANK", "0")
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise SystemExit(f"error: environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}: "
                         "need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise SystemExit(f"error: WORLD_SIZE={world} but MASTER_ADDR / MASTER_PORT are not set: launch with "
                         "torchrun --nproc_per_node N -m cat_pruning generate ...")
    return _Launch(rank, world, local_rank)


def _rank_device(device: str, launch: _Launch) -> str:
    """--device cuda under a launcher means this process's own GPU, cuda:LOCAL_RANK."""
    if device != "cuda" or launch.local_rank is None or not torch.cuda.is_available():
        return device  # an explicit cuda:N is the user's; no CUDA at all is _check_device's to report
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise SystemExit(f"error: LOCAL_RANK {launch.local_rank} but this machine has {count} CUDA device(s): "
                         f"launch at most {count} processes per node (--nproc_per_node)")
    return f"cuda:{launch.local_rank}"


# The ranks meet once, after every image is written, so rank 0 can print the totals. An idle rank
# waits there for the whole run, hence hours: the timeout only catches a rank that never arrives
# (torchrun itself stops every rank when one fails).
_MEET_TIMEOUT = datetime.timedelta(hours=24)


def _gather(record: dict, launch: _Launch) -> list[dict]:
    """Every rank's `record`, in rank order. Over gloo on CUDA too: a few numbers need no GPU
    collective, and gloo, unlike nccl, also works when ranks share one GPU (--device cuda:0)."""
    if launch.world == 1:
        return [record]
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=_MEET_TIMEOUT)
    try:
        records: list = [None] * launch.world
        dist.all_gather_object(records, record)
    finally:
        dist.destroy_process_group()
    return records


def _load_patched(args: argparse.Namespace):
    """The pipeline, patched with CAT unless --dense, the same way on every rank; --height and
    --width checked against the sizes it takes before anything runs."""
    import cat_pruning

    pipe = load_pipeline(args.model, args.device, _dtype(args))
    if type(getattr(pipe, "transformer", None)).__name__ == "WanTransformer3DModel":
        raise SystemExit(f"error: generate writes pictures; {type(pipe).__name__} makes videos: use `python -m "
                         "cat_pruning demo --model video` (the shipped video model) or the Python API "
                         "(cat_pruning.patch(pipe))")
    _check_size(pipe, args)
    if not args.dense:
        try:
            cat_pruning.patch(pipe, _config(args))
        except (TypeError, ValueError) as err:  # a model variant the adapter does not support
            raise SystemExit(f"error: {err}") from None
    return pipe


class _Sizes(NamedTuple):
    """The image sizes a pipeline takes, in pixels (None: not known from its configuration)."""

    multiple: int  # height and width must be multiples of this
    maximum: int | None  # and at most this
    default: tuple[int, int] | None  # (height, width) when none is given


def _sizes(pipe) -> _Sizes:
    """What the shipped pipelines (pixel space) and diffusers' latent pipelines take: multiples of
    a token's side in pixels (patch size times the VAE's downsampling; Flux packs 2x2 latents per
    token), at most the positional table's side (SD3's pos_embed_max_size, in tokens)."""
    from .photos.pipeline import PATCH, PhotoFluxPipeline
    from .tiny import TinyT2IPipeline

    if isinstance(pipe, PhotoFluxPipeline):  # rotary positions: no maximum
        return _Sizes(PATCH, None, (pipe.image_size, pipe.image_size))
    transformer = getattr(pipe, "transformer", None)
    config = getattr(transformer, "config", {}) or {}
    patch = config.get("patch_size") or 1
    if isinstance(pipe, TinyT2IPipeline):  # pixel space: the transformer's sizes are pixels
        scale, default = 1, config.get("sample_size")
    else:
        scale = getattr(pipe, "vae_scale_factor", None)
        if not isinstance(scale, int):
            return _Sizes(1, None, None)
        if type(transformer).__name__.startswith("Flux"):
            patch *= 2
        default = getattr(pipe, "default_sample_size", None)
        default = default * scale if isinstance(default, int) else None
    table = config.get("pos_embed_max_size")
    return _Sizes(patch * scale, table * patch * scale if table else None,
                  (default, default) if isinstance(default, int) else None)


def _check_size(pipe, args: argparse.Namespace) -> None:
    """--height / --width the pipeline cannot take: a message in pixels instead of diffusers'
    traceback (in token units) from inside the first step."""
    rules = _sizes(pipe)
    for flag in ("height", "width"):
        value = getattr(args, flag, None)
        if value is None or (value % rules.multiple == 0 and (rules.maximum is None or value <= rules.maximum)):
            continue
        model = SHIPPED.get(args.model, f"{type(pipe).__name__} at {args.model}")
        takes = f"multiples of {rules.multiple} pixels" + (f" up to {rules.maximum}" if rules.maximum else "")
        default = f" (default {rules.default[0]}x{rules.default[1]})" if rules.default else ""
        raise SystemExit(f"error: --{flag} {value}: the {model} takes heights and widths that are {takes}{default}")


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _pipeline_default(pipe, name: str):
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _run_name(pipe, args: argparse.Namespace, size: tuple[int, int] | None) -> str | None:
    """Everything besides prompt and seed that decides a picture, for its file name:
    <dense or CAT settings>-<model>-<H>x<W>-<steps>steps-g<guidance>-<dtype> (steps and guidance
    as the pipeline runs them when not given). None while the size is not known."""
    if size is None:
        return None
    if args.dense:
        parts = ["dense"]
    else:
        cfg = _config(args)
        parts = [f"cat-k{cfg.keep_ratio}-f{cfg.full_steps}" + (f"-r{cfg.refresh_every}" if cfg.refresh_every else "")
                 + ("-forecast" if cfg.forecast != "none" else "")
                 + (f"-{args.output_cache}" if args.output_cache else "")]
    parts += [args.model if args.model in SHIPPED else _slug(Path(args.model).resolve().name or "model"),
              f"{size[0]}x{size[1]}"]
    steps = args.steps if args.steps is not None else _pipeline_default(pipe, "num_inference_steps")
    if isinstance(steps, int):
        parts.append(f"{steps}steps")
    guidance = args.guidance if args.guidance is not None else _pipeline_default(pipe, "guidance_scale")
    if isinstance(guidance, (int, float)):
        parts.append(f"g{guidance:g}")
    parts.append(_DTYPE_NAMES.get(_dtype(args), str(_dtype(args)).replace("torch.", "")))
    return "-".join(parts)


def _expected_size(pipe, args: argparse.Namespace) -> tuple[int, int] | None:
    default = _sizes(pipe).default
    height = args.height if args.height is not None else (default[0] if default else None)
    width = args.width if args.width is not None else (default[1] if default else None)
    return (height, width) if height is not None and width is not None else None


def _paths(prefix: str, prompt: str, seed: int, run: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """(image, token map) paths of one prompt."""
    path = args.out / f"{prefix}{_slug(prompt)}-seed{seed}-{run}.png"
    return path, path.with_name(path.stem + "-tokens.png")


def _refuse_existing(paths, args: argparse.Namespace) -> None:
    """Never replace an earlier picture silently: without --overwrite an existing file is an error."""
    if args.overwrite:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        what = f"{existing[0]} and {len(existing) - 1} more files exist" if len(existing) > 1 else \
            f"{existing[0]} exists"
        raise SystemExit(f"error: {what} already, from a run with the same prompt, seed and settings: pass "
                         "--overwrite to replace them, or another --out")


def _write(pipe, prompt: str, seed: int, prefix: str, args: argparse.Namespace):
    """Generate `prompt` with `seed` and write <prefix><prompt>-seed<seed>-<run>.png (_run_name) and,
    with CAT once the caches exist, its map of recompute counts (-tokens.png), refusing to replace
    existing files without --overwrite.

    Returns (image path, seconds, the CAT stats or None when dense, (map path, label) or None, the
    run's part of the name)."""
    from PIL import Image

    import cat_pruning

    image, seconds = _run(pipe, prompt, args, seed)
    run = _run_name(pipe, args, tuple(image.shape[-2:]))
    path, heat_path = _paths(prefix, prompt, seed, run, args)
    _refuse_existing([path, heat_path], args)  # checked before the run where the size was known
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_uint8(image[0])).save(path)
    if args.dense:
        return path, seconds, None, None, run
    stats = cat_pruning.stats(pipe)
    if stats.recomputed is None:  # the caches were never made (steps < full_steps - 1)
        return path, seconds, stats, None, run
    heat, label = _recompute_map(stats, tuple(image.shape[-2:]))
    heat.save(heat_path)
    return path, seconds, stats, (heat_path, label), run


def _generate_prompt(args: argparse.Namespace, launch: _Launch) -> int:
    if launch.rank > 0:
        print(f"[rank {launch.rank}] idle: one --prompt, which rank 0 generates")
        return 0
    pipe = _load_patched(args)
    run = _run_name(pipe, args, _expected_size(pipe, args))
    if run is not None:
        _refuse_existing(_paths("", args.prompt, args.seed, run, args), args)
    path, seconds, stats, heat, _ = _write(pipe, args.prompt, args.seed, "", args)
    print(f"{path} ({seconds:.2f} s)")
    if heat is not None:
        print(f"{heat[0]} ({heat[1]})")
    if stats is not None:
        print(stats)
    return 0


def _generate_file(args: argparse.Namespace, launch: _Launch) -> int:
    t0 = time.perf_counter()
    prompts = read_prompts(args.prompts_file)
    mine = range(launch.rank, len(prompts), launch.world)
    digits = max(4, len(str(len(prompts) - 1)))  # zero-padded indices sort like the file
    tag = f"[rank {launch.rank}] " if launch.world > 1 else ""
    seconds, macs, run = [], [], None  # rank 0, which prints the summary, always has prompt 0
    if not mine:
        print(f"{tag}idle: {len(prompts)} prompts for {launch.world} processes")
    else:
        pipe = _load_patched(args)
        if hasattr(pipe, "get_label_ids"):  # DiT: refuse a bad class name before any image is made
            for i, prompt in enumerate(prompts):
                try:
                    pipe.get_label_ids([prompt])
                except ValueError as err:
                    raise SystemExit(f"error: --prompts-file {args.prompts_file}, prompt {i} ({prompt!r}): "
                                     f"{type(pipe).__name__} takes an ImageNet class name: {err}") from None
        run = _run_name(pipe, args, _expected_size(pipe, args))
        if run is not None:  # before the first image, not at the 57th
            _refuse_existing([p for i in mine for p in _paths(f"{i:0{digits}d}-", prompts[i], args.seed + i, run,
                                                                args)], args)
        pipe.set_progress_bar_config(disable=True)  # one bar over the prompts, not one per image
        from tqdm.auto import tqdm

        bar = tqdm(mine, desc=f"rank {launch.rank}" if launch.world > 1 else "generate", unit="image")
        for i in bar:
            path, s, stats, _, run = _write(pipe, prompts[i], args.seed + i, f"{i:0{digits}d}-", args)
            seconds.append(s)
            if stats is not None:
                macs.append(stats.mac_fraction)
            bar.write(f"{tag}{path} ({s:.2f} s" + (f", MACs {100 * stats.mac_fraction:.1f}% of dense)"
                                                   if stats is not None else ")"))
    records = _gather(dict(images=len(seconds), seconds=sum(seconds), macs=macs), launch)
    if launch.rank == 0:
        images = sum(r["images"] for r in records)
        fractions = [f for r in records for f in r["macs"]]
        per_image = sum(r["seconds"] for r in records) / images
        print(f"{images} images of {args.prompts_file} over {launch.world} process(es) in "
              f"{time.perf_counter() - t0:.1f} s, {per_image:.2f} s each"
              + (f", MACs {100 * sum(fractions) / len(fractions):.1f}% of dense" if fractions else "")
              + f": {args.out}/{'N' * digits}-<prompt>-seed<S>-{run}.png"
              + (" and -tokens.png (steps computed per token)" if fractions else ""))
    return 0


def generate(args: argparse.Namespace) -> int:
    """One prompt (--prompt) or a file of prompts (--prompts-file), with CAT unless --dense.

    --prompt P writes <P>-seed<S>-<settings>.png, with CAT also <...>-tokens.png (how many steps
    computed each token, with a colour bar in steps; the same colours in every map of a run), and
    prints the generation's CAT stats. <settings> is everything else that decides the picture:
    <dense or CAT settings>-<model>-<H>x<W>-<steps>steps-g<guidance>-<dtype>, with the pipeline's
    own steps, guidance and size where none is given, e.g.
    a-red-circle-seed0-cat-k0.02-f8-r3-forecast-tiny-64x64-28steps-g4-fp32.png. Runs with other
    settings never share a file; a file that exists already (the same settings, or another device
    or --backend, which the name leaves out) is an error before anything is generated unless
    --overwrite is given.

    Sizes are checked before the model runs: the shipped models take multiples of 2 pixels (the
    tiny model at most 64, the size of its position table); diffusers pipelines multiples of
    their token's side in pixels and, for SD3, at most pos_embed_max_size tokens.

    --prompts-file FILE takes one prompt a line; blank lines and lines starting with '#' are
    skipped. Prompt i (counting from 0 over the prompts kept) is seeded --seed + i and written as
    NNNN-<prompt>-seed<S>-<settings>.png with NNNN = i (and its -tokens.png), so the folder holds
    the same files whatever the number of processes.

    Data parallel: launched by torchrun or accelerate launch, each process reads RANK, WORLD_SIZE
    and LOCAL_RANK, loads and patches its own pipeline (--device cuda means cuda:LOCAL_RANK) and
    generates prompts i with i % WORLD_SIZE == RANK; a process left without prompts says so. The
    processes meet once, at the end (over gloo), for rank 0's summary. Each image depends only on
    its prompt and seed, so N processes write the images one process writes (byte for byte on the
    CPU at the same thread count; torchrun sets OMP_NUM_THREADS=1 unless it is set).

      torchrun --nproc_per_node 8 -m cat_pruning generate --prompts-file prompts.txt --out out/run
    """
    launch = _launch()
    return (_generate_file if args.prompts_file is not None else _generate_prompt)(args, launch)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    full_steps = _config(args).full_steps
    if args.steps is not None and full_steps >= args.steps:
        print(f"note: full_steps {full_steps} >= steps {args.steps}: every step runs dense", file=sys.stderr)
    if args.command == "generate":
        args.device = _rank_device(args.device, _launch())
    _check_device(args)
    if args.device.startswith("cuda:"):  # kernels launch on the current device: make it this one
        torch.cuda.set_device(torch.device(args.device))
    return {"demo": demo, "generate": generate}[args.command](args)
