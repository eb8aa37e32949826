"""The shipped tiny text-to-image model (cat_pruning.tiny) and its training script."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
try:
    import cat_pruning.tiny  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from harness import tool_module  # noqa: E402

from cat_pruning.tiny import (  # noqa: E402
    VOCAB,
    WEIGHTS_DIR,
    TinyT2IPipeline,
    TinyTokenizer,
    load_tiny_pipeline,
    make_batch,
    make_example,
)

PROMPT = "a red circle above a blue square on a yellow background"


@pytest.fixture(scope="module")
def pipe():
    return load_tiny_pipeline()


def _train_module():
    return tool_module("train_tiny_t2i")


def test_scenes_deterministic_and_in_vocab():
    a, ca = make_example(123)
    b, cb = make_example(123)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb
    x, caps = make_batch(range(200))
    assert x.shape == (200, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    tok = TinyTokenizer(VOCAB, 20)
    assert len(VOCAB) < 64
    for c in caps:
        ids = tok.encode(c)
        assert tok.unk_token_id not in ids and ids[-1] == tok.pad_token_id, c  # known words, fits
        assert tok.decode(ids) == c


def test_shipped_model_loads(pipe):
    assert isinstance(pipe, TinyT2IPipeline)
    assert (WEIGHTS_DIR / "model_index.json").is_file()
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*.safetensors"))
    assert size < 25e6
    cfg = pipe.transformer.config
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    assert tokens >= 1024, f"the shipped model has {tokens} image tokens; pruning needs room to act"


def test_same_seed_same_image(pipe):
    kw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(7), **kw).images
    b = pipe(PROMPT, generator=torch.Generator().manual_seed(7), **kw).images
    c = pipe(PROMPT, generator=torch.Generator().manual_seed(8), **kw).images
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    pil = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(7)).images[0]
    assert pil.size == (64, 64)


def test_loop_contract(pipe):
    """One transformer call and one scheduler.step per step; CFG batch is [uncond; cond]."""
    calls = []

    def pre_hook(module, args, kwargs):
        calls.append({k: kwargs[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")})

    h = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    orig_step, n_steps = pipe.scheduler.step, []

    def counting_step(*a, **k):
        n_steps.append(1)
        return orig_step(*a, **k)

    pipe.scheduler.step = counting_step
    try:
        out = pipe(
            [PROMPT, "a green bar on a black background"],
            num_inference_steps=3,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
    finally:
        h.remove()
        del pipe.scheduler.step
    assert pipe.do_classifier_free_guidance and pipe.guidance_scale == 3.0
    assert len(calls) == 3 and len(n_steps) == 3
    assert out.images.shape == (2, 3, 64, 64)
    ehs = calls[0]["encoder_hidden_states"]
    assert ehs.shape[0] == 4
    uncond, _ = pipe.text_encoder.encode([""], device="cpu")
    cond, _ = pipe.text_encoder.encode([PROMPT], device="cpu")
    torch.testing.assert_close(ehs[0], uncond[0])
    torch.testing.assert_close(ehs[1], uncond[0])
    torch.testing.assert_close(ehs[2], cond[0])
    x = calls[0]["hidden_states"]
    torch.testing.assert_close(x[:2], x[2:])
    # without guidance: batch of B
    calls.clear()
    h = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    finally:
        h.remove()
    assert not pipe.do_classifier_free_guidance
    assert len(calls) == 2 and calls[0]["hidden_states"].shape[0] == 1


def test_train_script_tiny_config(tmp_path):
    train = _train_module()
    out = tmp_path / "run"
    rc = train.main(
        [
            "--out",
            str(out),
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--tiny-config",
            "--bf16",
            "--log-every",
            "2",
            "--sample-steps",
            "2",
        ]
    )
    assert rc == 0
    for f in ("model_index.json", "train_log.csv", "train_summary.json", "samples.png"):
        assert (out / f).is_file(), f
    rows = (out / "train_log.csv").read_text().strip().splitlines()
    assert rows[0] == "step,loss,lr,elapsed_s" and len(rows) == 4
    p = load_tiny_pipeline(path=out)
    img = p(
        "a red circle on a yellow background",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_train_script_is_reproducible(tmp_path):
    """Same seed, same arguments: the same weights, byte for byte (bf16 autocast included)."""
    train = _train_module()
    argv = ["--steps", "3", "--batch-size", "2", "--tiny-config", "--bf16", "--no-samples", "--save-every", "0"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert train.main(["--out", str(out), *argv]) == 0
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*.safetensors"))
    assert len(files) == 2  # transformer and text encoder
    for f in files:
        assert (runs[0] / f).read_bytes() == (runs[1] / f).read_bytes(), f
