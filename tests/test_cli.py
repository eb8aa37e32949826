"""The command line on the shipped tiny model (few steps) and its errors."""

import json

import pytest

from cat_pruning.cli import main


def test_demo_writes_pictures_and_numbers(tmp_path):
    assert main(["demo", "--prompts", "1", "--steps", "4", "--full-steps", "2", "--out", str(tmp_path),
                 "--backend", "torch"]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert len(rows) == 1 and (tmp_path / "00.png").stat().st_size > 0
    assert 0 < rows[0]["mac_fraction"] < 1 and 0 < rows[0]["ssim"] <= 1


def test_generate_dense_and_cat(tmp_path, capsys):
    for extra in (["--dense"], []):
        assert main(["generate", "--prompt", "a red circle on a blue background", "--steps", "3",
                     "--full-steps", "2", "--out", str(tmp_path), "--backend", "torch", *extra]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["seed0-cat-k0.3-f2.png", "seed0-dense.png"]
    assert "pruned" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--model", "/nonexistent"], "not a diffusers pipeline folder"),
    (["generate", "--prompt", "x", "--keep-ratio", "0"], "must lie in"),
    (["generate", "--prompt", "x", "--full-steps", "1"], "must be >= 2"),
    (["demo", "--steps", "0"], "must be >= 1"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in str(exc.value) + capsys.readouterr().err
