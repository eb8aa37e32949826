"""The command line on the shipped tiny model (few steps) and its errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cat_pruning import CATConfig, cli
from cat_pruning.cli import main
from cat_pruning.stats import CATStats, StepStats

FAST = ["--steps", "3", "--full-steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--backend", "torch"]


def test_demo_writes_pictures_and_numbers(tmp_path):
    assert main(["demo", "--prompts", "1", "--steps", "5", "--full-steps", "2", "--out", str(tmp_path),
                 "--backend", "torch"]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert len(rows) == 1 and (tmp_path / "00.png").stat().st_size > 0
    assert 0 < rows[0]["mac_fraction"] < 1 and 0 < rows[0]["ssim"] <= 1


def test_generate_dense_and_cat(tmp_path, capsys):
    """Dense, CAT-F at patch()'s defaults, with the noise cache, and the paper's CAT (--paper), each
    named by its settings."""
    for extra in (["--dense"], [], ["--output-cache", "noise"], ["--paper"]):
        assert main(["generate", "--prompt", "a red circle on a blue background", "--steps", "5",
                     "--full-steps", "2", "--out", str(tmp_path), "--backend", "torch", *extra]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    stem = "a-red-circle-on-a-blue-background-seed0"
    run = "tiny-64x64-5steps-g4-fp32"  # the tiny model's size and guidance
    catf = "cat-k0.02-f2-r3-forecast"
    assert names == sorted(f"{stem}-{n}" for n in (f"{catf}-{run}-tokens.png", f"{catf}-{run}.png",
                                                   f"{catf}-noise-{run}-tokens.png", f"{catf}-noise-{run}.png",
                                                   f"cat-k0.3-f2-{run}-tokens.png", f"cat-k0.3-f2-{run}.png",
                                                   f"dense-{run}.png"))
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
    (["generate", "--prompt", "x", "--output-cache", "latent"], "invalid choice"),
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
    stem = "a-red-circle-seed0-cat-k0.02-f2-r3-forecast-tiny-64x64-1steps-g4-fp32"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{stem}-tokens.png", f"{stem}.png"]
    captured = capsys.readouterr()
    assert "every step runs dense" in captured.err and "1 steps (1 anchor, 0 pruned)" in captured.out
    assert "no step was pruned" in captured.out and "caches never read" in captured.out
    assert "steps computed per token: 1 to 1 of 1 (colour bar 0 to 1)" in captured.out


# ------------------------------------------------------------------ file names: other settings, other files


def _pngs(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


def test_other_model_steps_size_or_guidance_never_share_a_file(tmp_path):
    """The issue's runs: --steps 4, then --model photos at another size, wrote one file name and
    the second replaced the first; each setting is now in the name."""
    base = ["generate", "--prompt", "x", "--dense", "--out", str(tmp_path), "--device", "cpu"]
    runs = [["--steps", "2"], ["--steps", "2", "--model", "photos", "--height", "16", "--width", "16"],
            ["--steps", "3"], ["--steps", "2", "--height", "32", "--width", "32"], ["--steps", "2", "--guidance", "2"],
            ["--steps", "2", "--dtype", "bfloat16"]]  # fmt: skip
    for extra in runs:
        assert main([*base, *extra]) == 0
    assert sorted(_pngs(tmp_path)) == sorted(f"x-seed0-dense-{run}.png" for run in [
        "tiny-64x64-2steps-g4-fp32", "photos-16x16-2steps-g1-fp32", "tiny-64x64-3steps-g4-fp32",
        "tiny-32x32-2steps-g4-fp32", "tiny-64x64-2steps-g2-fp32", "tiny-64x64-2steps-g4-bf16"])  # fmt: skip


def test_an_existing_picture_is_refused_before_generating_unless_overwrite(tmp_path, monkeypatch, capsys):
    argv = ["generate", "--prompt", "a red circle", "--out", str(tmp_path), *FAST]
    assert main(argv) == 0
    before = _pngs(tmp_path)
    assert len(before) == 2  # the image and its token map
    (first,) = [name for name in before if not name.endswith("-tokens.png")]
    (tmp_path / first).write_bytes(b"an earlier picture")
    real_run = cli._run
    monkeypatch.setattr(cli, "_run", lambda *a, **k: pytest.fail("generated although the file exists"))
    with pytest.raises(SystemExit, match=rf"{first} and 1 more files exist already.*--overwrite"):
        main(argv)
    assert (tmp_path / first).read_bytes() == b"an earlier picture"
    # a prompts file is checked as a whole, before its first image
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\na red circle\n")
    file_argv = ["generate", "--prompts-file", str(prompts), "--out", str(tmp_path / "run"), *FAST]
    monkeypatch.setattr(cli, "_run", real_run)
    assert main(file_argv) == 0
    monkeypatch.setattr(cli, "_run", lambda *a, **k: pytest.fail("generated although the files exist"))
    with pytest.raises(SystemExit, match="0000-a-blue-square-seed0-.* and 3 more files exist already"):
        main(file_argv)
    monkeypatch.setattr(cli, "_run", real_run)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 0
    assert _pngs(tmp_path) == before


def test_the_overwrite_flag_is_documented(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--overwrite replace pictures that exist already" in out
    assert "<dense or CAT settings>-<model>-<H>x<W>-<steps>steps-g<guidance>-<dtype>" in out


# ------------------------------------------------------------------ sizes, help


@pytest.mark.parametrize("extra, message", [
    (["--height", "40", "--width", "72"], "--width 72: the shipped tiny model takes heights and widths that are "
                                          "multiples of 2 pixels up to 64 (default 64x64)"),
    (["--height", "33"], "--height 33: the shipped tiny model takes heights and widths that are multiples of 2"),
    (["--model", "photos", "--width", "15"], "--width 15: the shipped photo model takes heights and widths that "
                                             "are multiples of 2 pixels (default 64x64)"),
])  # fmt: skip
def test_a_size_the_model_cannot_take_is_refused_in_pixels(tmp_path, monkeypatch, extra, message):
    """It used to end in diffusers' traceback about pos_embed_max_size, in token units."""
    monkeypatch.setattr(cli, "_run", lambda *a, **k: pytest.fail("ran although the size is wrong"))
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x", "--out", str(tmp_path), "--device", "cpu", *extra])
    assert message in str(exc.value)
    assert not any(tmp_path.iterdir())


def test_sizes_of_diffusers_pipelines():
    """SD3 at 1024 pixels: latents 8x smaller, patch 2, a 192-token position table."""

    class Config(dict):
        pass

    class SD3Transformer2DModel:
        config = Config(patch_size=2, pos_embed_max_size=192, sample_size=128)

    class FluxTransformer2DModel:
        config = Config(patch_size=1)

    class Pipe:
        vae_scale_factor, default_sample_size = 8, 128

    sd3, flux = Pipe(), Pipe()
    sd3.transformer, flux.transformer = SD3Transformer2DModel(), FluxTransformer2DModel()
    assert cli._sizes(sd3) == (16, 3072, (1024, 1024))
    assert cli._sizes(flux) == (16, None, (1024, 1024))  # 2x2 latents packed per token


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_help_is_plain_text_and_covers_every_option(command, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "`" not in top and "python -m cat_pruning demo" in top
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "`" not in out
    assert "--device DEVICE torch device to run on" in out
    assert "--backend {auto,triton,cuda,torch} kernels of CAT's token selection" in out


# ------------------------------------------------------------------ the token map


def _stats(modes, recomputed=None):
    steps = [StepStats(i, m, 4 if m == "pruned" else 16) for i, m in enumerate(modes)]
    return CATStats("SD3", CATConfig(full_steps=2), 16, 4, 1, steps, macs=len(modes), macs_dense=len(modes),
                    cache_bytes=1 << 20, recomputed=recomputed)


def test_token_maps_of_a_run_share_one_colour_scale_with_a_labelled_bar():
    """Two images of one run: a token computed 4 times has the same colour in both maps, whatever
    the other counts (it used to be scaled min to max per image); the bar is labelled in steps."""
    modes = ["anchor", "fill", "pruned", "refresh", "pruned", "pruned"]  # 3 steps compute every token
    a = torch.full((1, 4, 4), 3.0)
    a[0, 0, 0], a[0, 3, 3] = 4, 6
    b = torch.full((1, 4, 4), 4.0)
    b[0, 1, 1] = 5
    assert cli._map_scale(_stats(modes)) == (3, 6)
    maps = [cli._recompute_map(_stats(modes, counts), (64, 64)) for counts in (a, b)]
    assert maps[0][1] == "steps computed per token: 3 to 6 of 6 (colour bar 3 to 6)"
    first, second = (np.asarray(m) for m, _ in maps)
    assert first.shape == second.shape and first.shape[1] > 256  # the map at 256 pixels, then the bar
    # the token of count 4: (0, 0) in the first map, (0, 0) in the second too; count 3 nowhere in the second
    assert (first[10, 10] == second[10, 10]).all()
    assert (first[100, 100] != second[100, 100]).any()  # 3 in the first, 4 in the second
    # the bar: brightest at the top (6 steps), darkest at the bottom (3), beside the map
    bar = first[:256, 256 + 8 + 7]
    assert (bar[0] == first[255, 255]).all() and (bar[255] == first[100, 100]).all()
    labels = first[:256, 256 + 8 + 14 + 4:]
    assert (labels < 128).any()  # the tick labels are drawn


def test_the_token_map_written_by_generate_has_the_colour_bar(tmp_path):
    assert main(["generate", "--prompt", "a red circle", "--out", str(tmp_path), *FAST]) == 0
    (tokens,) = tmp_path.glob("*-tokens.png")
    with Image.open(tokens) as picture:
        assert picture.width > picture.height > 256  # 32 pixels drawn 8x, the bar beside, the caption below


# ------------------------------------------------------------------ stats as generate prints it


def test_stats_before_any_generation_says_nothing_ran():
    stats = _stats([])
    assert str(stats) == ("CAT Pruning on SD3: nothing has run yet (no generation since the patch or the last reset; "
                          "keep_ratio 0.02, full_steps 2)")


def test_stats_header_counts_the_modes_of_the_table():
    """The header used to say "8 dense" where the table showed 6 dense rows, anchor and fill."""
    modes = ["dense"] * 6 + ["anchor", "fill", "pruned", "pruned", "refresh", "pruned"]
    text = str(_stats(modes))
    assert "12 steps (6 dense, 1 anchor, 1 fill, 1 refresh, 3 pruned)" in text.splitlines()[0]
    rows = [line.split()[1] for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert rows == modes


def test_an_all_dense_run_reports_no_cache_use():
    """A generation shorter than full_steps read no cache: the 24.5 MiB the state allocated for the
    next step are not reported as the run's caches."""
    dense = _stats(["dense"] * 5 + ["anchor"])
    assert not dense.caches_used and "6 steps (5 dense, 1 anchor, 0 pruned)" in str(dense)
    assert "caches never read; 1.00 MiB allocated for later steps, kept for the next generation" in str(dense)
    pruned = _stats(["anchor", "fill", "pruned"])
    assert pruned.caches_used and "caches 1.00 MiB (forecast taylor)" in str(pruned)
