"""What the prototypes in bench/experiments/ share: the scene model, held-out prompts, their
dense images (cached under /tmp), one generation call, and the PSNR line each run prints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cat_pruning.metrics import psnr


class HeldOut:
    """The scene model on `count` distinct scene-generator captions from `caption_seed` on (none
    of the quality bench's from 950,000), seed 0, `steps` steps, and their dense images."""

    def __init__(self, count: int, steps: int, caption_seed: int = 950_000, threads: int = 2) -> None:
        from cat_pruning.tiny import load_tiny_pipeline, make_example

        torch.set_num_threads(threads)
        self.steps = steps
        self.pipe = load_tiny_pipeline(device="cpu", dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts: list[str] = []
        seed = caption_seed
        while len(self.prompts) < count:
            cap = make_example(seed)[1]
            seed += 1
            if cap not in self.prompts:
                self.prompts.append(cap)
        cache = Path(f"/tmp/output_dense_{caption_seed}_{count}_{steps}.pt")
        self.dense = torch.load(cache) if cache.exists() else [self.generate(p) for p in self.prompts]
        torch.save(self.dense, cache)

    def generate(self, prompt: str) -> torch.Tensor:
        g = torch.Generator("cpu").manual_seed(0)
        return self.pipe(prompt, num_inference_steps=self.steps, generator=g, output_type="pt").images[0]

    def score(self, run: dict, each: Callable[[str], torch.Tensor], t0: float,
              *extra: str | Callable[[], str]) -> None:
        """Generate every prompt with `each` and print the run, `extra` (callables: read after
        the generations) and its PSNR mean (worst) against dense."""
        ps = [psnr(each(p), d) for p, d in zip(self.prompts, self.dense, strict=True)]
        notes = [e() if callable(e) else e for e in extra]
        print(json.dumps(run), *notes, f"PSNR {sum(ps) / len(ps):.2f} (worst {min(ps):.2f})",
              f"{time.time() - t0:.0f}s", flush=True)
