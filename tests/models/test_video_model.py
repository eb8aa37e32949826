"""The shipped video model (cat_pruning.video, a pixel-space WanTransformer3DModel), its clips and
its training script (tools/train_video_model.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
try:
    import cat_pruning.video  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from harness import tool_module  # noqa: E402

import cat_pruning  # noqa: E402
from cat_pruning.tiny import TinyTokenizer  # noqa: E402
from cat_pruning.video import (  # noqa: E402
    FRAMES,
    SIZE,
    VOCAB,
    WEIGHTS_DIR,
    TinyWanPipeline,
    eval_captions,
    load_video_pipeline,
    random_clip,
    render,
)
from cat_pruning.video.clips import batch  # noqa: E402

PROMPT = "a red circle moving left over blue stripes"
F32 = dict(atol=2e-4, rtol=1e-4)  # tests/models/harness.py's fp32 tolerance


@pytest.fixture(scope="module")
def pipe():
    p = load_video_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe, seed=7, steps=3, prompt=PROMPT):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=g, output_type="pt").frames


def _train_module():
    return tool_module("train_video_model")


def test_clips_are_deterministic_captioned_and_mostly_static():
    x, caps = batch(np.random.default_rng([0, 5]), 16)
    y, again = batch(np.random.default_rng([0, 5]), 16)
    assert np.array_equal(x, y) and caps == again
    assert x.shape == (16, 3, FRAMES, SIZE, SIZE) and -1 <= x.min() and x.max() <= 1
    tok = TinyTokenizer(VOCAB, 16)
    for c in caps + eval_captions(32):
        ids = tok.encode(c)
        assert tok.unk_token_id not in ids and ids[-1] == tok.pad_token_id, c  # every word known, room to spare
    assert len(set(eval_captions(32))) == 32 and eval_captions(4, offset=2) == eval_captions(6)[2:]
    clip = random_clip(np.random.default_rng(3))
    frames = render(clip)
    changed = np.abs(np.diff(frames, axis=0)).max(-1) > 1e-3  # (F - 1, H, W): pixels that change
    assert 0 < changed.mean() < 0.35  # the shapes move, most of the picture does not


def test_train_script_tiny_config_writes_a_loadable_model_and_resumes_exactly(tmp_path):
    train = _train_module()
    argv = ["--tiny-config", "--batch-size", "2", "--log-every", "1", "--no-samples", "--save-every", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(["--out", str(whole), "--steps", "4", *argv]) == 0
    assert train.main(["--out", str(parts), "--steps", "2", *argv]) == 0
    assert train.main(["--out", str(parts), "--steps", "4", "--resume", *argv]) == 0  # from its checkpoint
    rows = (parts / "train_log.csv").read_text().strip().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [
        r.split(",")[:2] for r in (whole / "train_log.csv").read_text().strip().splitlines()[1:]]
    files = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert len(files) == 2  # transformer and text encoder
    for f in files:  # resumed == uninterrupted, byte for byte
        assert (whole / f).read_bytes() == (parts / f).read_bytes(), f
    summary = json.loads((whole / "train_summary.json").read_text())
    assert summary["finished"] and summary["command"].startswith("python tools/train_video_model.py")


def _tiny_pipeline(tmp_path):
    """An untrained tiny-config pipeline as the training script saves it."""
    train = _train_module()
    transformer, text_encoder = train.build_models(train.TINY)
    train.save_pipeline(tmp_path, transformer, text_encoder, 3.0)
    p = load_video_pipeline(path=tmp_path)
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_runs_cfg_per_branch_and_keep_ratio_one_equals_dense(tmp_path):
    """WanPipeline's loop: one transformer call per CFG branch and step, each inside its
    cache_context, so a patched transformer keeps caches per branch."""
    p = _tiny_pipeline(tmp_path)
    calls = []
    p.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape),
                                            with_kwargs=True)
    dense = _gen(p, steps=5)
    assert dense.shape == (1, 3, FRAMES, SIZE, SIZE) and len(calls) == 10  # two calls per step
    with cat_pruning.patched(p, keep_ratio=1.0, full_steps=2, backend="torch"):
        torch.testing.assert_close(_gen(p, steps=5), dense, **F32)
    with cat_pruning.patched(p, keep_ratio=0.3, full_steps=2, backend="torch", final_full_steps=0):
        cat = _gen(p, steps=5)
        stats = cat_pruning.stats(p)
    assert stats.branches == ("cond", "uncond") and stats.num_tokens == FRAMES * (SIZE // 2) ** 2
    assert stats.recomputed.shape == (1, FRAMES, SIZE // 2, SIZE // 2)
    assert "pruned" in {s.mode for s in stats.steps} and not torch.equal(cat, dense)
    assert torch.equal(_gen(p, steps=5), dense)  # unpatched again


def test_shipped_model_loads_and_generates(pipe):
    assert isinstance(pipe, TinyWanPipeline) and type(pipe.transformer).__name__ == "WanTransformer3DModel"
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*.safetensors"))
    assert 0 < size < 10e6
    assert not list(WEIGHTS_DIR.rglob("*.bin")) and not list(WEIGHTS_DIR.rglob("*.pt"))
    a, b = _gen(pipe), _gen(pipe)
    assert a.shape == (1, 3, FRAMES, SIZE, SIZE) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    frames = pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0).frames  # "np", one call per step
    assert frames.shape == (1, FRAMES, SIZE, SIZE, 3)


def test_cli_demo_video_writes_an_animation(tmp_path):
    from PIL import Image

    from cat_pruning.cli import main

    demo = tmp_path / "demo"
    common = ["--steps", "5", "--full-steps", "2", "--device", "cpu", "--backend", "torch"]  # pruned steps
    assert main(["demo", "--model", "video", "--prompts", "1", "--out", str(demo), *common]) == 0
    rows = json.loads((demo / "demo.json").read_text())
    assert len(rows) == 1 and rows[0]["prompt"] == PROMPT and rows[0]["mac_fraction"] < 1
    gif = Image.open(demo / "00.gif")
    assert gif.n_frames == FRAMES and (demo / "00.png").is_file()
    with pytest.raises(SystemExit, match="generate writes pictures; TinyWanPipeline makes videos"):
        main(["generate", "--model", "video", "--prompt", PROMPT, "--out", str(tmp_path), *common])
