"""bench/run.py: records carry the required fields, providers are checked before timing, a
wrong provider is reported FAIL and not timed, missing suites are reported. CPU, a few seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"

REQUIRED = {
    "op", "provider", "case", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps", "frac_peak_bw",
    "peak_gbps", "device", "device_name", "torch", "triton", "diffusers", "git_sha", "cmd", "check",
}  # fmt: skip


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts bench/ on sys.path, so `common` and `kernels` import
    return mod


@pytest.fixture
def no_interpreter(monkeypatch):
    # The conftest turns the Triton interpreter on for CPU tests; the benchmark must not run
    # Triton on full-size CPU shapes, so it leaves triton out unless TRITON_INTERPRET=1.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("CAT_BENCH_NO_PROGRESS", "1")


def test_kernels_gather_records(run_module, no_interpreter, tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "bench.json"
    try:
        rc = run_module.main(["--suite", "kernels", "--device", "cpu", "--quick", "--filter", "gather",
                              "--json", str(path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(path.read_text())
    records = doc["records"]
    providers = {r["provider"] for r in records}
    assert {"torch-ref", "torch-baseline"} <= providers
    assert "triton" not in providers  # not on cpu without the interpreter
    for r in records:
        missing = REQUIRED - r.keys()
        assert not missing, f"{r['provider']} lacks {missing}"
        assert r["op"] == "gather_tokens"
        assert r["check"] == "pass", r.get("error")
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0 and r["frac_peak_bw"] > 0
        assert "--filter" in r["cmd"] and r["case"] in r["cmd"]
    assert "gather_tokens[bnc,sd3-1024,bfloat16]" in out


def test_wrong_provider_is_fail_and_not_timed(run_module):
    import common

    def make():
        g = torch.Generator().manual_seed(0)
        return {"x": torch.randn(2, 37, 11, generator=g), "idx": torch.tensor([[0, 5, 36], [1, 2, 3]])}

    def gather(x, idx):
        return x[torch.arange(2)[:, None], idx]

    case = common.Case(
        op="gather_tokens", provider="broken", case_id="gather_tokens[tiny]", shape={"B": 2}, dtype="float32",
        make=make, call=lambda i: gather(i["x"], i["idx"]) + 1e-3, reference=lambda i: gather(i["x"], i["idx"]),
        exact=True, nbytes=100,
    )  # fmt: skip
    rec = common.run_case(case, "cpu", quick=True)
    assert rec["check"] == "FAIL" and "differ" in rec["error"]
    assert "median_ms" not in rec
    good = common.run_case(
        common.Case(**{**case.__dict__, "provider": "ok", "call": lambda i: gather(i["x"], i["idx"])}), "cpu", True
    )
    assert good["check"] == "pass" and good["median_ms"] > 0
    text = run_module.table([rec, good])
    assert "FAIL gather_tokens[tiny] [broken]" in text


def test_compare_tolerances():
    import common

    a = torch.randn(64, dtype=torch.float32)
    assert common.compare(a, a + 1e-7) is None
    assert common.compare(a, a + 1e-2) is not None
    b = a.bfloat16()
    assert common.compare(b, b, exact=True) is None
    assert common.compare(torch.arange(4), torch.arange(4).flip(0)) is not None  # integers: exact
    assert "shape" in common.compare(a, a[:3])


def test_missing_suite(run_module, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run_module, "SUITES", {"nosuch": "nosuch_suite_module"})
    assert run_module.main(["--suite", "nosuch", "--device", "cpu", "--json", str(tmp_path / "a.json")]) == 2
    assert "not available" in capsys.readouterr().err
    # Under --suite all a missing suite is reported, not an error.
    assert run_module.main(["--suite", "all", "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["records"] == []


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_gpu_check_script_syntax():
    import subprocess

    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_every_op_has_cases(run_module, no_interpreter):
    kernels = run_module.load_suite("kernels")

    cases, _ = kernels.build_cases("cpu", quick=True, shapes="tiny")
    ops = {c.op for c in cases}
    assert ops == {*kernels.OPS, "token_stats+select_tokens"}
    assert {"torch-ref", "torch-baseline"} <= {c.provider for c in cases}
    variants = {c.case_id.split(",")[0] for c in cases}
    assert {"select_tokens[first", "select_tokens[later", "gather_tokens[bnc", "gather_tokens[bhnd"} <= variants
    full, _ = kernels.build_cases("cpu", quick=False)
    shapes = {c.case_id.split(",")[1] for c in full}
    assert shapes == {"sd3-1024", "flux-1024", "flux-2048", "n16384"}
