"""Command line: ``python -m cat_pruning demo`` and ``python -m cat_pruning generate``.

demo       generates a handful of prompts with the shipped tiny model, dense and with CAT, and
           writes one PNG per prompt (dense | CAT | how often each token was recomputed), with
           wall time, speedup, MAC fraction and PSNR/SSIM against dense.
generate   one prompt with the shipped model or any supported diffusers pipeline saved on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEMO_PROMPTS = [
    "a red circle above a blue square on a yellow background",
    "a green triangle left of a white circle on a black background",
    "a blue square on a red to yellow gradient background",
    "a yellow circle below a purple triangle on a green background",
    "a white square right of an orange circle on a blue background",
    "a black triangle on a white background",
]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def _full_steps(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cat_pruning", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, steps: int) -> None:
        p.add_argument("--keep-ratio", type=_ratio, default=0.3, help="share of tokens recomputed (default 0.3)")
        p.add_argument("--full-steps", type=_full_steps, default=8, help="dense steps first (default 8)")
        p.add_argument("--steps", type=_positive_int, default=steps, help=f"denoising steps (default {steps})")
        p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4.0)")
        p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                       help="default float32 on cpu, bfloat16 on cuda")
        p.add_argument("--backend", choices=["auto", "triton", "cuda", "torch"], default="auto")

    demo = sub.add_parser("demo", help="dense vs CAT on the shipped tiny model, PNGs and a table")
    common(demo, 28)
    demo.add_argument("--prompts", type=_positive_int, default=4, help=f"how many (1..{len(DEMO_PROMPTS)})")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")

    gen = sub.add_parser("generate", help="one prompt, with CAT unless --dense")
    common(gen, 28)
    gen.add_argument("--model", default="tiny", help="'tiny' (the shipped model) or a pipeline folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", type=Path, default=Path("out"), help="output folder (default out)")
    gen.add_argument("--dense", action="store_true", help="run the unpatched model")
    return parser


def _dtype(args: argparse.Namespace) -> torch.dtype:
    name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return getattr(torch, name)


def load_pipeline(model: str, device: str, dtype: torch.dtype):
    """The shipped tiny pipeline ("tiny") or a diffusers pipeline folder whose transformer is supported."""
    from .adapters import find_adapter

    if model == "tiny":
        from .tiny import load_tiny_pipeline

        return load_tiny_pipeline(device=device, dtype=dtype)
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"error: {model!r} is not a diffusers pipeline folder (no model_index.json there)")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise SystemExit(f"error: {type(pipe).__name__} has no transformer; cat_pruning patches diffusion transformers")
    try:
        find_adapter(transformer)
    except TypeError as err:
        raise SystemExit(f"error: {err}") from None
    return pipe.to(device)


def _images(output) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] on the CPU from a pipeline output of any type."""
    images = output.images
    if isinstance(images, torch.Tensor):
        return images.float().cpu()  # after the generation: no denoising step is running
    arrays = [np.asarray(im, dtype=np.float32) / (255.0 if not isinstance(im, np.ndarray) else 1.0) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _run(pipe, prompt: str, args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    generator = torch.Generator("cpu").manual_seed(args.seed)
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator)
    t0 = time.perf_counter()
    out = pipe(prompt, output_type="pt", **kwargs)
    if str(args.device).startswith("cuda"):
        torch.cuda.synchronize()
    return _images(out), time.perf_counter() - t0


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def heatmap(counts: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) recompute counts -> an (H, W, 3) uint8 picture, dark = rarely, bright = often."""
    stops = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float32)
    c = counts.float()
    t = ((c - c.min()) / (c.max() - c.min()).clamp_min(1e-9)).numpy() * (len(stops) - 1)
    lo = np.floor(t).astype(int).clip(0, len(stops) - 2)
    frac = (t - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    ry, rx = size[0] // counts.shape[0], size[1] // counts.shape[1]
    return np.repeat(np.repeat(rgb, ry, 0), rx, 1).astype(np.uint8)


def _panel(dense: np.ndarray, cat: np.ndarray, heat: np.ndarray, heat_label: str, caption: str, scale: int = 4):
    from PIL import Image, ImageDraw

    tiles = [np.repeat(np.repeat(a, scale, 0), scale, 1) for a in (dense, cat, heat)]
    h, w = tiles[0].shape[:2]
    canvas = Image.new("RGB", (3 * w + 20, h + 40), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, ("dense", "CAT", heat_label), strict=True)):
        canvas.paste(Image.fromarray(tile), (i * (w + 10), 0))
        draw.text((i * (w + 10) + 4, h + 4), label, fill="black")
    draw.text((4, h + 22), caption[:110], fill="black")
    return canvas


def demo(args: argparse.Namespace) -> int:
    import cat_pruning

    from .metrics import psnr, ssim

    if args.prompts > len(DEMO_PROMPTS):
        raise SystemExit(f"error: --prompts must be at most {len(DEMO_PROMPTS)}")
    pipe = load_pipeline("tiny", args.device, _dtype(args))
    pipe.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    _run(pipe, DEMO_PROMPTS[0], args)  # warm-up: first-call allocations and lazy imports
    rows = []
    from tqdm.auto import tqdm

    for i, prompt in enumerate(tqdm(DEMO_PROMPTS[: args.prompts], desc="demo", unit="prompt")):
        dense, t_dense = _run(pipe, prompt, args)
        with cat_pruning.patched(pipe, keep_ratio=args.keep_ratio, full_steps=args.full_steps, backend=args.backend):
            cat, t_cat = _run(pipe, prompt, args)
            stats = cat_pruning.stats(pipe)
        counts = stats.recomputed[-1]  # the cond sample under CFG
        png = args.out / f"{i:02d}.png"
        label = f"steps computed per token: {int(counts.min())} (dark) to {int(counts.max())} (bright) of {args.steps}"
        heat = heatmap(counts, tuple(dense.shape[-2:]))
        _panel(_to_uint8(dense[0]), _to_uint8(cat[0]), heat, label, prompt).save(png)
        rows.append(dict(prompt=prompt, dense_s=t_dense, cat_s=t_cat, speedup=t_dense / t_cat,
                         mac_fraction=stats.mac_fraction, psnr_db=psnr(cat, dense), ssim=ssim(cat, dense),
                         png=str(png)))
    print(f"\nCAT Pruning demo: shipped tiny model, {args.steps} steps, keep_ratio {args.keep_ratio}, "
          f"full_steps {args.full_steps}, {args.device} {_dtype(args)}".replace("torch.", ""))
    print(f"{'prompt':<62} {'dense s':>8} {'CAT s':>7} {'speedup':>8} {'MACs':>6} {'PSNR dB':>8} {'SSIM':>6}")
    for r in rows:
        print(f"{r['prompt'][:62]:<62} {r['dense_s']:8.2f} {r['cat_s']:7.2f} {r['speedup']:7.2f}x "
              f"{100 * r['mac_fraction']:5.1f}% {r['psnr_db']:8.2f} {r['ssim']:6.3f}")
    (args.out / "demo.json").write_text(json.dumps(rows, indent=1))
    print(f"pictures: {args.out}/NN.png (dense | CAT | tokens recomputed); numbers: {args.out}/demo.json")
    return 0


def generate(args: argparse.Namespace) -> int:
    import cat_pruning

    pipe = load_pipeline(args.model, args.device, _dtype(args))
    if not args.dense:
        cat_pruning.patch(pipe, keep_ratio=args.keep_ratio, full_steps=args.full_steps, backend=args.backend)
    image, seconds = _run(pipe, args.prompt, args)
    args.out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    name = "dense" if args.dense else f"cat-k{args.keep_ratio}-f{args.full_steps}"
    path = args.out / f"seed{args.seed}-{name}.png"
    Image.fromarray(_to_uint8(image[0])).save(path)
    print(f"{path} ({seconds:.2f} s)")
    if not args.dense:
        print(cat_pruning.stats(pipe))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.full_steps > args.steps:
        print(f"note: full_steps {args.full_steps} >= steps {args.steps}: every step runs dense", file=sys.stderr)
    return {"demo": demo, "generate": generate}[args.command](args)
