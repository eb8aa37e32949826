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
    spec.loader.exec_module(mod)  # puts bench/ on sys.path, so `common` and the suites import
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
def test_default_outputs_are_git_ignored(run_module, capsys):
    """Without --json every suite writes under bench/results/local/ (git-ignored), never over a
    committed result; the committed names are written only when --json names them."""
    import argparse
    import subprocess

    quality_report = pytest.importorskip("quality_report")
    quality_models = pytest.importorskip("quality_models")
    local = BENCH / "results" / "local"
    paths = []
    for suite in [*run_module.SUITES, "all"]:
        args = argparse.Namespace(suite=suite, device="cpu", extra=[], quick=False)
        paths.append(run_module.default_json(args))
    assert paths[0] == local / "kernels-cpu.json" and paths[-1] == local / "all-cpu.json"
    for name, model in quality_models.MODELS.items():
        paths += quality_report.output_paths(None, model, "cpu")
        # a JSON of the default name, named by --json, keeps the committed examples name next to it
        named = quality_report.output_paths(BENCH / "results" / f"{model.results_stem}-cpu.json", model, "cpu")
        assert named[3] == BENCH / "results" / model.examples_name, name
    assert all(p.parent == local for p in paths), paths
    with pytest.raises(SystemExit):
        run_module.parse_args(["--help"])
    assert "bench/results/local/" in capsys.readouterr().out
    git = subprocess.run(["git", "check-ignore", *map(str, paths)], cwd=BENCH.parent, capture_output=True, text=True)
    if git.returncode == 128:
        pytest.skip("not a git checkout")
    assert sorted(git.stdout.split()) == sorted(map(str, paths))


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


def _parallel_events(kind: str, modes: list[str], t: int, n: int, k: int, shape: dict, cat: bool, gen: int = 1) -> list:
    """Fake collective events of one rank's generation, as CollectiveCounter records them: per
    step, the calls the plans imply with the rows each mode computes (W=2, fp32)."""
    events = []
    for step, mode in enumerate(modes):
        rows, image = (t + k, k) if mode == "pruned" else (t + n, n)
        if kind == "cp":
            src = "cat_pruning.parallel" if cat else "diffusers.models.attention_dispatch"
            per_tensor = rows // 2 * shape["hidden"] * 4  # this rank's rows, all heads
            for _ in range(4 * (shape["double"] + shape["single"])):  # q, k, v, out of every attention
                events.append((gen, step, "funcol.all_to_all_single", src, "all_to_all", per_tensor))
            events.append((gen, step, "funcol.all_gather_tensor", "diffusers.hooks.context_parallel", "all_gather",
                           image // 2 * shape["out"] * 4))  # fmt: skip
        else:
            for _ in range(shape["double"]):
                for r in (image, t, image, t):
                    events.append((gen, step, "funcol.all_reduce", "torch.distributed.tensor.placement_types",
                                   "all_reduce", r * shape["hidden"] * 4))  # fmt: skip
            for _ in range(shape["single"]):
                events.append((gen, step, "funcol.all_reduce", "torch.distributed.tensor.placement_types",
                               "all_reduce", rows * shape["hidden"] * 4))  # fmt: skip
    if cat:
        events.append((gen, 0, "dist.all_gather", "cat_pruning.parallel", "all_gather", 80))  # the agreement check
    return events


def test_parallel_suite_options_and_records_without_ranks(run_module, tmp_path):
    """The parallel suite's options, schedule, traffic accounting, checks and report, on the
    events a 2-rank run records (built here, no launch)."""
    import argparse

    parallel = run_module.load_suite("parallel")
    ns = argparse.Namespace(device="cpu", extra=["--scenarios", "cp-cat,1p-dense", "--steps", "5", "--repeats", "1",
                                                 "--model", "flux-mini"])  # fmt: skip
    opts = parallel.parse_suite_args(ns)
    assert opts.scenarios == ["cp-dense", "cp-cat", "1p-dense"]  # the dense run of the ratios is added
    assert opts.dtype == "float32" and opts.steps == 5
    with pytest.raises(SystemExit, match="choose from"):
        parallel.parse_suite_args(argparse.Namespace(device="cpu", extra=["--scenarios", "cp-ring"]))
    with pytest.raises(SystemExit, match="unknown options"):
        parallel.parse_suite_args(argparse.Namespace(device="cpu", extra=["--stepz", "3"]))
    assert parallel.results_path(ns) == BENCH / "results" / "local" / "parallel-cpu.json"
    assert [parallel.full_steps(s) for s in (28, 14, 5)] == [8, 4, 2]
    assert parallel.model_shape("photos", 128)["heads"] == 3  # why --model auto falls back to flux-mini on 2 ranks

    shape = parallel.model_shape("flux-mini", 128)
    t, n, k = shape["T"], shape["N"], 22
    cat_modes = [parallel.cat_config("default", 5).mode(i) for i in range(5)]
    assert cat_modes == ["anchor", "fill", "pruned", "pruned", "refresh"]
    latents = torch.randn(1, n, 64)

    def result(kind, modes, kk=None, events=True):
        ev = _parallel_events(kind, modes, t, n, kk or n, shape, cat=kk is not None) if events else []
        out = dict(generations=[dict(total=0.5 + 0.1 * i, steps=[0.1] * 5) for i in range(2)], modes=modes,
                   latents=latents, events=ev)
        return {**out, "K": kk} if kk else out  # fmt: skip

    results = {
        "cp-dense": [result("cp", ["dense"] * 5)] * 2,
        "cp-cat": [result("cp", cat_modes, k)] * 2,
        "1p-dense": [result("1p", ["dense"] * 5, events=False)],
    }
    records = parallel.build_records(opts, "cpu", results, "test")
    by = {r["scenario"]: r for r in records}
    assert [r["check"] for r in records] == ["pass", "pass", "n/a"], [r.get("error") for r in records]
    cat = by["cp-cat"]
    assert cat["pruned_all_to_all_ratio"] == pytest.approx((t + k) / (t + n), abs=1e-12) == cat["pruned_ratio_ideal"]
    assert set(cat["traffic"]["by_mode"]) == {"anchor", "fill", "pruned", "refresh"}
    assert cat["mode_ratio"]["fill"] == pytest.approx(1.0, abs=1e-4)  # + the 80-byte agreement gather at step 0
    dense_step = by["cp-dense"]["dense_step_bytes"]
    pruned_step = cat["traffic"]["by_mode"]["pruned"]["bytes"]
    assert cat["traffic_ratio"] == pytest.approx((3 * dense_step + 2 * pruned_step + 80) / (5 * dense_step))
    assert 0 < cat["traffic_ratio_28"] < 1 and cat["traffic_ratio_28_ideal"] == pytest.approx(
        (14 + 14 * (t + k) / (t + n)) / 28)  # the 28-step schedule: 14 of 28 steps pruned
    assert by["cp-dense"]["max_abs_diff_vs_1p"] == 0 and cat["speedup"] == pytest.approx(1.0)
    assert "--scenarios cp-cat" in cat["cmd"] and cat["cmd"].startswith("python bench/run.py --suite parallel")
    md = parallel.report(records, opts, "cpu", "test", markdown=True)
    assert "python bench/run.py --suite parallel --device cpu --model flux-mini --steps 5" in md
    assert "| cp-cat | 22 |" in md and "13.0% (all-to-all)" in md

    # a pruned step that moved dense rows, and a dense run whose counter missed a kind of call: FAIL
    broken = [e if e[1] != 2 or e[4] != "all_to_all" else (*e[:5], e[5] * (t + n) // (t + k))
              for e in results["cp-cat"][0]["events"]]  # fmt: skip
    results["cp-cat"] = [{**results["cp-cat"][0], "events": broken}] * 2
    results["cp-dense"] = [{**results["cp-dense"][0], "events": [e for e in results["cp-dense"][0]["events"]
                                                                 if e[4] != "all_gather"]}] * 2  # fmt: skip
    records = parallel.build_records(opts, "cpu", results, "test")
    assert records[0]["check"] == "FAIL" and "plans imply" in records[0]["error"]
    assert records[1]["check"] == "FAIL" and "not (T+K)/(T+N)" in records[1]["error"]


def test_parallel_counter_counts_outermost_calls_and_restores(run_module, monkeypatch):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    parallel = run_module.load_suite("parallel")

    def fake_gather(x, gather_dim, group):
        return x

    def fake_all_to_all(x, output_split_sizes, input_split_sizes, group):
        return funcol.all_gather_tensor(x, 0, group)  # nested: counted once, as the all-to-all

    monkeypatch.setattr(funcol, "all_to_all_single", fake_all_to_all)
    monkeypatch.setattr(funcol, "all_gather_tensor", fake_gather)
    original_dist = dist.all_gather
    counter = parallel.CollectiveCounter()
    x = torch.randn(3, 5, dtype=torch.float64)[:, 1:4]  # a non-contiguous view: its 9 elements count
    with counter:
        assert funcol.all_to_all_single is not fake_all_to_all and dist.all_gather is not original_dist
        counter.generation, counter.step = 1, 4
        funcol.all_to_all_single(x, None, None, None)
        funcol.all_gather_tensor(x[:1], gather_dim=0, group=None)
    assert funcol.all_to_all_single is fake_all_to_all and dist.all_gather is original_dist
    assert counter.events == [(1, 4, "funcol.all_to_all_single", __name__, "all_to_all", 72),
                              (1, 4, "funcol.all_gather_tensor", __name__, "all_gather", 24)]  # fmt: skip


def test_curve_suite_measures_drops_below_smaller_keep_ratios(monkeypatch):
    """bench/curve.py: a point's drop is how far its mean lies below the best mean at any smaller
    keep ratio; its options parse into keep ratios (one token as '1tok') and CATConfig fields."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    import curve

    assert curve.monotone_drops([40.0, 41.0, 40.5, 42.0, 41.9]) == pytest.approx([0, 0, 0.5, 0, 0.1])
    args = argparse.Namespace(extra=["--keeps", "1tok,0.1", "--config", "final_full_steps=1,forecast_from=refresh"],
                              device="cpu")
    opts = curve.parse_suite_args(args)
    assert opts.keep_list == ["1tok", 0.1]
    assert opts.overrides == {"final_full_steps": 1, "forecast_from": "refresh"}
    assert "local" in curve.results_path(args).parts


def test_tokens_suite_solves_the_keep_ratio_that_fits_a_budget(monkeypatch):
    """bench/tokens.py: the token-budget side gets the most tokens whose MACs (linear in the tokens,
    from one token and keep 0.5) stay within the one-token pick's, or nothing outside 5%-50%."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    import tokens

    mac_one, mac_half, n = 0.545, 0.772, 1024

    def mac(keep):
        return mac_one + (round(keep * n) - 1) * (mac_half - mac_one) / 511

    keep = tokens.solve_keep(mac_one, mac_half, 0.636, n)
    assert keep * n == round(keep * n) and mac(keep) <= 0.636 < mac(keep + 1 / n)
    assert tokens.solve_keep(mac_one, mac_half, 0.55, n) is None  # 12 tokens: under 5%
    assert tokens.solve_keep(mac_one, mac_half, 0.9, n) is None  # over half the tokens
    args = argparse.Namespace(extra=["--budgets", "0.44,0.65", "--tune-prompts", "4"], device="cpu")
    opts = tokens.parse_suite_args(args)
    assert opts.budget_list == [0.44, 0.65] and opts.tune_prompts == 4
    assert "local" in tokens.results_path(args).parts
    with pytest.raises(SystemExit, match="budgets"):
        tokens.parse_suite_args(argparse.Namespace(extra=["--budgets", "65"], device="cpu"))


def test_cache_records_count_cat_and_taylorseer_state_on_the_meta_device(monkeypatch):
    """bench/e2e.py cache[...]: DiT-XL/2 at 256 px (every layer cached, one branch). CAT-F keeps
    bf16 values and bf16 slopes (slope_dtype="cache", the default), twice the paper's bf16 rows,
    plus the read buffer the layers share and the output state (the default hidden cache's
    value, slope, curvature and forecast slope, the model width wide and bf16 like its slopes);
    with fp32 slopes three times plus the same with that state's three in fp32, with fp8 slopes
    1.5 times plus the scales and the same; with fused_attention the same less the K and V read
    buffers; diffusers' TaylorSeer holds one bf16 factor per order and attention output (28
    layers, 256 tokens, width 1152, batch 2)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import e2e

    name, module, config, gen = next(c for c in e2e.real_configs() if c[0] == "dit-xl-2-256")
    r = e2e.cache_record(name, module, config, gen, branches=1,
                         only=("paper", "catf", "catf-fp32-slopes", "catf-fp8-slopes", "catf-fused"))
    per, gib = r["cache_gib_per_branch"], 2**30
    kv_rows = 28 * 2 * gen["batch"] * 256 * 1152 * 2  # layers x (K, V) x batch x tokens x width x bf16
    assert per["paper"] * gib >= kv_rows and per["paper"] < 1.01 * kv_rows / gib
    assert 2 * per["paper"] < per["catf"] < 2.25 * per["paper"]
    assert 3 * per["paper"] < per["catf-fp32-slopes"] < 3.25 * per["paper"]
    out_state = 3 * gen["batch"] * 256 * 1152 * 2  # slope, curvature, forecast slope: 2 bytes more each in fp32
    assert (per["catf-fp32-slopes"] - per["catf"]) * gib == kv_rows + out_state
    # fp8 slopes: a byte per element and a 4-byte scale per head of 72 beside the bf16 values
    assert (1.5 + 2 / 72) * per["paper"] < per["catf-fp8-slopes"] < 1.8 * per["paper"]
    read_kv = 2 * gen["batch"] * 256 * 1152 * 2  # one K and one V buffer for all layers
    assert (per["catf"] - per["catf-fused"]) * gib == read_kv
    attention_out = 28 * gen["batch"] * 256 * 1152 * 2
    assert per["taylorseer-order1"] * gib == 2 * attention_out
    assert per["taylorseer-order2"] * gib == 3 * attention_out
    assert r["cache_gib"] == per  # one branch


def test_python_overhead_is_ops_auto_minus_the_backend_it_picks(run_module, monkeypatch):
    """kernel_bench.python_overhead: per case, ops-auto's median minus that of the provider auto
    resolves to, in µs, into the record and its note; other cases and failed rows are left alone."""
    import kernel_bench as kb  # bench/ is on sys.path once run_module is loaded

    monkeypatch.setattr(kb, "auto_backend", lambda device: "cuda")  # auto -> the extension ("ext")
    records = [dict(case="a", provider="ext", median_ms=0.010), dict(case="a", provider="ops-auto", median_ms=0.035,
               note="auto -> cuda"), dict(case="a", provider="torch-ref", median_ms=0.5),
               dict(case="b", provider="ops-auto", median_ms=0.2, note=""), dict(case="c", provider="ext"),
               dict(case="c", provider="ops-auto", median_ms=0.1)]  # fmt: skip
    kb.python_overhead(records, "cpu")
    assert records[1]["overhead_us"] == pytest.approx(25.0)
    assert records[1]["note"] == "auto -> cuda; overhead 25 us a call"
    assert all("overhead_us" not in r for i, r in enumerate(records) if i != 1)
