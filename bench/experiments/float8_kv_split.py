"""Research helper, not part of the package: which of K and V costs PSNR under kv_dtype="float8".

WHICH=k quantizes only the K rows (and slopes): the V caches keep an exact shadow copy that their
dequantization returns; WHICH=v the reverse. The README's "Cache memory" numbers (video model,
fp32, its first 8 captions, seed 0):

    WHICH=k python bench/experiments/float8_kv_split.py '[{}, {"kv_dtype": "float8"}]'
    WHICH=v python bench/experiments/float8_kv_split.py '[{"kv_dtype": "float8"}]'
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality_models  # noqa: E402

import cat_pruning  # noqa: E402
from cat_pruning import cache  # noqa: E402
from cat_pruning.metrics import psnr  # noqa: E402

WHICH = os.environ["WHICH"]  # "k" or "v": the cache that stays fp8
_float8, _store, _scatter, _dequantize = (cache.ReuseStore._float8, cache.Float8Rows.store_,
                                          cache.Float8Rows.scatter_, cache.Float8Rows.dequantize_)  # fmt: skip


def float8(self, name, data, head_dim, dtype):
    rows = _float8(self, name, data, head_dim, dtype)
    rows.exact = not name.endswith("/" + WHICH)
    return rows


def store_(self, x):
    _store(self, x)
    if self.exact:
        self.shadow = x.to(self.dtype).clone()


def scatter_(self, idx, rows, dim):
    _scatter(self, idx, rows, dim)
    if self.exact:
        cache._scatter_rows_(self.shadow, idx, rows.to(self.dtype), dim)


def dequantize_(self, out):
    return out.copy_(self.shadow) if self.exact else _dequantize(self, out)


def main() -> None:
    cache.ReuseStore._float8 = float8
    cache.Float8Rows.store_, cache.Float8Rows.scatter_, cache.Float8Rows.dequantize_ = store_, scatter_, dequantize_
    torch.set_num_threads(2)
    model = quality_models.MODELS["video"]
    pipe = model.load("cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = model.prompts(8)

    def clip(prompt: str) -> torch.Tensor:
        out = pipe(prompt, num_inference_steps=28, generator=torch.Generator().manual_seed(0), output_type="pt")
        return quality_models.first_image(out)

    dense = [clip(p) for p in prompts]
    for setting in json.loads(sys.argv[1]):
        cat_pruning.patch(pipe, backend="torch", **setting)
        values = [psnr(clip(p), d) for p, d in zip(prompts, dense, strict=True)]
        cat_pruning.unpatch(pipe)
        print(f"fp8 {WHICH} only, {json.dumps(setting)}: PSNR mean {statistics.fmean(values):.2f} dB, "
              f"worst {min(values):.2f}", flush=True)


if __name__ == "__main__":
    main()
