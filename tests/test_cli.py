"""The command line on the shipped tiny model (few steps) and its errors."""

import json

import pytest
import torch

from cat_pruning.cli import main


def test_demo_writes_pictures_and_numbers(tmp_path):
    assert main(["demo", "--prompts", "1", "--steps", "4", "--full-steps", "2", "--out", str(tmp_path),
                 "--backend", "torch"]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert len(rows) == 1 and (tmp_path / "00.png").stat().st_size > 0
    assert 0 < rows[0]["mac_fraction"] < 1 and 0 < rows[0]["ssim"] <= 1


def test_generate_dense_and_cat(tmp_path, capsys):
    """Dense, CAT-F at patch()'s defaults, and the paper's CAT (--paper), each named by its settings."""
    for extra in (["--dense"], [], ["--paper"]):
        assert main(["generate", "--prompt", "a red circle on a blue background", "--steps", "5",
                     "--full-steps", "2", "--out", str(tmp_path), "--backend", "torch", *extra]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    stem = "a-red-circle-on-a-blue-background-seed0"
    catf = "cat-k0.02-f2-r3-forecast"
    assert names == sorted(f"{stem}-{n}" for n in (f"{catf}-tokens.png", f"{catf}.png", "cat-k0.3-f2-tokens.png",
                                                   "cat-k0.3-f2.png", "dense.png"))
    out = capsys.readouterr().out
    assert "pruned" in out and "refresh" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--model", "/nonexistent"], "no such folder"),
    (["generate", "--prompt", "x", "--model", "/"], "not a diffusers pipeline folder"),
    (["generate", "--prompt", "x", "--guidance", "nan"], "must be finite"),
    (["generate", "--prompt", "x", "--guidance", "-1"], "must be >= 0"),
    (["generate", "--prompt", "x", "--steps", "ten"], "not an integer"),
    (["generate", "--prompt", "x", "--keep-ratio", "half"], "not a number"),
    (["generate", "--prompt", "x", "--device", "tpu9"], "--device"),
    (["generate", "--prompt", "x", "--keep-ratio", "0"], "must lie in"),
    (["generate", "--prompt", "x", "--full-steps", "1"], "must be >= 2"),
    (["generate", "--prompt", "x", "--refresh-every", "-1"], "must be >= 0"),
    (["generate", "--prompt", "x", "--forecast", "linear"], "invalid choice"),
    (["demo", "--steps", "0"], "must be >= 1"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in str(exc.value) + capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["generate", "--prompt", "x", "--device", "cuda"])


def test_generate_shorter_than_full_steps(tmp_path, capsys):
    """steps < full_steps: a note, every step dense, and a recompute map that counts the one step
    (the caches exist from the last dense step on; their counts must not be left uninitialised)."""
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--full-steps", "2",
                 "--out", str(tmp_path), "--backend", "torch"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "a-red-circle-seed0-cat-k0.02-f2-r3-forecast-tokens.png", "a-red-circle-seed0-cat-k0.02-f2-r3-forecast.png"]
    captured = capsys.readouterr()
    assert "every step runs dense" in captured.err and "0 pruned" in captured.out
    assert "1 (dark) to 1 (bright) of 1" in captured.out
