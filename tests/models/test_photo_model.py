"""The shipped photo model (cat_pruning.photos, a pixel-space FluxTransformer2DModel) and its
training script (tools/train_photo_model.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
try:
    import cat_pruning.photos  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from harness import tool_module  # noqa: E402

import cat_pruning  # noqa: E402
from cat_pruning.photos import (  # noqa: E402
    PHOTOS,
    VOCAB,
    WEIGHTS_DIR,
    ZOOMS,
    PhotoFluxPipeline,
    all_captions,
    eval_prompts,
    load_photo_pipeline,
    pack,
    unpack,
)
from cat_pruning.tiny import TinyTokenizer  # noqa: E402

PROMPT = "coffee, close-up"
F32 = dict(atol=2e-4, rtol=1e-4)  # the Flux family's fp32 tolerance in tests/models/harness.py


@pytest.fixture(scope="module")
def pipe():
    p = load_photo_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe, seed=7, steps=3, prompt=PROMPT):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=g, output_type="pt").images


def _train_module():
    return tool_module("train_photo_model")


def test_captions_fit_the_tokenizer():
    caps = all_captions()
    assert len(caps) == len(PHOTOS) * len(ZOOMS) == len(set(caps))
    tok = TinyTokenizer(VOCAB, 8)
    for c in caps:
        ids = tok.encode(c)
        assert tok.unk_token_id not in ids and ids[-1] == tok.pad_token_id, c
    first = eval_prompts(len(PHOTOS))
    assert [c.split(",")[0] for c in first] == list(PHOTOS)  # every photo once before any twice
    assert len(set(eval_prompts(2 * len(PHOTOS)))) == 2 * len(PHOTOS)


def test_pack_roundtrip():
    x = torch.randn(3, 3, 64, 40)
    t = pack(x)
    assert t.shape == (3, 32 * 20, 12)
    assert torch.equal(unpack(t, 64, 40), x)
    # token (r, c) holds the 2x2 pixels at rows 2r..2r+1, cols 2c..2c+1, channel-major
    assert torch.equal(t[1, 5 * 20 + 7].view(3, 2, 2), x[1, :, 10:12, 14:16])


def test_shipped_model_loads(pipe):
    assert isinstance(pipe, PhotoFluxPipeline)
    assert (WEIGHTS_DIR / "model_index.json").is_file()
    tr = pipe.transformer
    assert type(tr).__name__ == "FluxTransformer2DModel"
    assert len(tr.transformer_blocks) >= 1 and len(tr.single_transformer_blocks) >= 1  # double and single stream
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*.safetensors"))
    assert 0 < size < 25e6
    assert not list(WEIGHTS_DIR.rglob("*.bin")) and not list(WEIGHTS_DIR.rglob("*.pt"))
    assert (WEIGHTS_DIR.parent / "samples.png").is_file()
    image = _gen(pipe, steps=2)
    assert image.shape == (1, 3, 64, 64)  # patch 2: 1024 image tokens


def test_same_seed_same_image(pipe):
    a, b, c = _gen(pipe, 7), _gen(pipe, 7), _gen(pipe, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1
    pil = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(7)).images[0]
    assert pil.size == (64, 64)


def test_loop_contract_no_cfg_batch(pipe):
    """Flux style: one transformer call per step on a batch of B (no CFG halves), img_ids per token."""
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    try:
        pipe([PROMPT, "brick, medium"], num_inference_steps=3, output_type="pt")
    finally:
        h.remove()
    assert not pipe.do_classifier_free_guidance
    assert len(calls) == 3
    kw = calls[0]
    assert kw["hidden_states"].shape == (2, 1024, 12) and kw["img_ids"].shape == (1024, 3)
    assert torch.equal(kw["img_ids"][33], torch.tensor([0.0, 1.0, 1.0]))
    assert 0 < float(kw["timestep"][0]) <= 1  # Flux scales it by 1000 itself


def test_keep_ratio_one_equals_dense_and_pruning_runs(pipe):
    dense = _gen(pipe, steps=5)  # 2 full steps, 1 pruned, the last 2 in full
    with cat_pruning.patched(pipe, keep_ratio=1.0, full_steps=2, backend="torch"):
        torch.testing.assert_close(_gen(pipe, steps=5), dense, **F32)
    with cat_pruning.patched(pipe, keep_ratio=0.3, full_steps=2, backend="torch"):
        first, second = _gen(pipe, steps=5), _gen(pipe, steps=5)
        stats = cat_pruning.stats(pipe)
    assert torch.equal(first, second) and not torch.equal(first, dense)
    assert [s.mode for s in stats.steps][2:] == ["pruned", "refresh", "refresh"]  # the last two in full
    assert stats.num_tokens == 1024
    assert stats.mac_fraction < 0.9
    assert torch.equal(_gen(pipe, steps=5), dense)  # unpatched again


def test_cli_generate_and_demo_photos(tmp_path):
    import json

    from cat_pruning.cli import main

    common = ["--steps", "5", "--full-steps", "2", "--device", "cpu", "--backend", "torch"]  # one pruned step
    assert main(["generate", "--model", "photos", "--prompt", PROMPT, "--out", str(tmp_path), *common]) == 0
    assert len(list(tmp_path.glob("coffee-close-up-seed0-cat-*.png"))) == 2  # the image and its token map
    demo = tmp_path / "demo"
    assert main(["demo", "--model", "photos", "--prompts", "1", "--out", str(demo), *common]) == 0
    rows = json.loads((demo / "demo.json").read_text())
    assert len(rows) == 1 and rows[0]["prompt"] == "coffee, full view" and rows[0]["mac_fraction"] < 1
    assert (demo / "00.png").is_file()


def test_train_script_tiny_config_writes_a_loadable_model_and_resumes_exactly(tmp_path):
    pytest.importorskip("skimage")
    train = _train_module()
    argv = ["--tiny-config", "--batch-size", "2", "--photos", "coffee,brick", "--log-every", "1", "--no-samples",
            "--save-every", "2"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(["--out", str(whole), "--steps", "4", *argv]) == 0
    assert train.main(["--out", str(parts), "--steps", "2", *argv]) == 0
    assert train.main(["--out", str(parts), "--steps", "4", "--resume", *argv]) == 0  # from its checkpoint
    for f in ("model_index.json", "train_log.csv", "train_summary.json", "checkpoint.pt"):
        assert (whole / f).is_file(), f
    rows = (parts / "train_log.csv").read_text().strip().splitlines()
    assert rows[0] == "step,loss,lr,elapsed_s" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert [r.split(",")[1] for r in rows[1:]] == [
        r.split(",")[1] for r in (whole / "train_log.csv").read_text().strip().splitlines()[1:]
    ]
    files = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert len(files) == 2  # transformer and text encoder
    for f in files:  # resumed == uninterrupted, byte for byte
        assert (whole / f).read_bytes() == (parts / f).read_bytes(), f
    p = load_photo_pipeline(path=parts)
    img = p("brick, medium", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    assert type(p.transformer).__name__ == "FluxTransformer2DModel"
