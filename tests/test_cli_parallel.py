"""`generate --prompts-file`: parsing and its errors, the launcher's environment, and data
parallelism: two torchrun ranks write byte for byte the files one process writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cat_pruning import cli
from cat_pruning.cli import main, read_prompts

# Blank lines, a comment and stray whitespace: the indices (and seeds) count prompts, not lines.
PROMPTS = "# shapes\na red circle above a blue square\n\n  a green triangle  \n# done\na black triangle\n"
NAMES = ["a-red-circle-above-a-blue-square", "a-green-triangle", "a-black-triangle"]
# The tiny model at 32x32 pixels (256 tokens), 3 steps: anchor, fill, one pruned step.
FAST = ["--steps", "3", "--full-steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
        "--backend", "torch", "--seed", "5"]  # fmt: skip
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def alone(monkeypatch):
    """A process that no launcher started (the test runner may itself run under one)."""
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)


def _prompts_file(tmp_path, text=PROMPTS):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return path


def test_read_prompts_skips_blank_and_comment_lines(tmp_path):
    assert read_prompts(_prompts_file(tmp_path)) == ["a red circle above a blue square", "a green triangle",
                                                     "a black triangle"]  # fmt: skip


@pytest.mark.parametrize("make, message", [
    (lambda d: ["--prompt", "x", "--prompts-file", str(_prompts_file(d))], "not allowed with argument"),
    (lambda d: [], "one of the arguments --prompt --prompts-file is required"),
    (lambda d: ["--prompts-file", str(d / "missing.txt")], "no such file"),
    (lambda d: ["--prompts-file", str(d)], "is a folder"),
    (lambda d: ["--prompts-file", str(_prompts_file(d, "\n  \n# only comments\n"))], "holds no prompts"),
    (lambda d: ["--prompts-file", str(_prompts_file(d, ""))], "holds no prompts"),
], ids=["both", "neither", "missing", "folder", "comments-only", "empty"])  # fmt: skip
def test_bad_prompts_input_is_a_clear_error(tmp_path, alone, capsys, make, message):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--device", "cpu", "--out", str(tmp_path / "out"), *make(tmp_path)])
    assert message in str(exc.value) + capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}, "RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR / MASTER_PORT are not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}, "need 0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "two"}, "is not an integer"),
])  # fmt: skip
def test_bad_launch_environment_is_a_clear_error(tmp_path, alone, monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=message):
        main(["generate", "--prompts-file", str(_prompts_file(tmp_path)), "--device", "cpu"])


@pytest.mark.parametrize("what", ["file", "prompt"])
def test_a_rank_without_prompts_says_so(tmp_path, alone, monkeypatch, capsys, what):
    """Rank 3 of 4 over 3 prompts (or rank 1 with one --prompt) loads nothing and writes nothing;
    the meeting at the end is stood in for, as the other ranks do not exist here."""
    monkeypatch.setenv("WORLD_SIZE", "4" if what == "file" else "2")
    monkeypatch.setenv("RANK", "3" if what == "file" else "1")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    met = []
    monkeypatch.setattr(cli, "_gather", lambda record, launch: met.append(record) or [record])
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: pytest.fail("an idle rank loaded the model"))
    given = ["--prompts-file", str(_prompts_file(tmp_path))] if what == "file" else ["--prompt", "x"]
    assert main(["generate", *given, "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "idle" in out and not (tmp_path / "out").exists()
    assert ("3 prompts for 4 processes" in out and met == [dict(images=0, seconds=0, macs=[])]) if what == "file" \
        else (met == [])
    assert "images of" not in out  # the summary is rank 0's


def test_two_ranks_write_what_one_process_writes(tmp_path, alone, capsys):
    """The same files, byte for byte: prompt i is seeded --seed + i and named by i whichever rank
    made it. One thread in both, as torchrun's ranks get (thread count can change float sums)."""
    prompts = _prompts_file(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["generate", "--prompts-file", str(prompts), "--out", str(tmp_path / "one"), *FAST]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count(" s, MACs ") == 3 and "3 images of" in out and "over 1 process" in out

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"OMP_NUM_THREADS": "1"}
    # --standalone: a free port for the rendezvous, so parallel test runs do not collide on 29500
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cat_pruning", "generate", "--prompts-file", str(prompts),
                          "--out", str(tmp_path / "two"), *FAST],
                         env=env, capture_output=True, text=True, timeout=150)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("[rank 0] ") == 2 and run.stdout.count("[rank 1] ") == 1
    assert run.stdout.count("images of") == 1 and "3 images of" in run.stdout and "over 2 process" in run.stdout

    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    settings = "cat-k0.02-f2-r3-forecast-tiny-32x32-3steps-g4-fp32"  # CAT settings, model, size, steps, guidance, dtype
    assert sorted(one) == sorted(f"{i:04d}-{name}-seed{5 + i}-{settings}{end}.png"
                                 for i, name in enumerate(NAMES) for end in ("", "-tokens"))  # fmt: skip
    assert sorted(two) == sorted(one)
    assert [name for name in one if one[name] != two[name]] == []
