"""bench/quality.py smoke test: 1 prompt, 3 steps, one CAT setting and one peer, through bench/run.py.
The peer (cache-dit) is optional: without it the record must carry the import error, not vanish."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("bench_run_quality", BENCH / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_suite_smoke(run_module, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CAT on the CPU without the (slow) Triton interpreter
    monkeypatch.setenv("CAT_BENCH_NO_PROGRESS", "1")
    path = tmp_path / "quality.json"
    threads = torch.get_num_threads()
    try:
        rc = run_module.main(["--suite", "quality", "--device", "cpu", "--json", str(path),
                              "--prompts", "1", "--seeds", "1", "--steps", "3", "--examples", "1",
                              "--methods", "cat:0.5:2,cache-dit-dbcache", "--peer-warmup", "1",
                              "--tune-items", "1", "--mac-items", "1", "--target-cat", "cat:0.5:2"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    records = {r["provider"]: r for r in json.loads(path.read_text())["records"]}
    assert set(records) == {"dense", "cat:0.5:2", "cache-dit-dbcache"}
    for r in records.values():
        assert r["suite"] == "quality" and r["case"] == f"quality[{r['provider']}]"
        assert r["shape"]["steps"] == 3 and r["shape"]["items"] == 1
        assert r["dense_reproducible"] is True

    dense, cat = records["dense"], records["cat:0.5:2"]
    assert dense["mac_fraction"] == 1.0 and dense["median_ms"] > 0
    # 2 dense steps of 3, then one pruned step with half the image tokens
    assert 0.6 < cat["mac_fraction"] < 1.0
    assert cat["mac_fraction"] == pytest.approx(cat["stats_mac_fraction"], abs=0.03)  # whole call vs transformer
    assert math.isfinite(cat["psnr_mean"]) and cat["psnr_mean"] > 10
    assert 0 < cat["ssim_worst"] <= cat["ssim_mean"] <= 1
    assert cat["speedup"] > 0 and len(cat["per_item"]) == 1

    peer = records["cache-dit-dbcache"]
    if importlib.util.find_spec("cache_dit") is None:
        assert peer["status"] == "error" and "cache_dit" in peer["error"]
    else:
        assert peer["status"] == "ok", peer.get("error")
        assert 0 < peer["mac_fraction"] <= 1.0 and "residual_diff_threshold" in peer["params"]
        assert peer["psnr_mean"] > 0

    md = path.with_suffix(".md").read_text()
    assert "| CAT k=0.5 f=2 |" in md and "## Reading" in md
    assert path.with_name("quality-examples.png").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert path.with_suffix(".png").is_file()

    # The same run split in two (dense in both) and merged back: one table with every method.
    merge = _merge_module()
    doc = json.loads(path.read_text())
    dense, cat, peer = (records[k] for k in ("dense", "cat:0.5:2", "cache-dit-dbcache"))
    for name, recs in (("a", [dense, cat]), ("b", [dense, peer])):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(doc, records=recs)))
    merged = tmp_path / "merged.json"
    assert merge.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(merged)]) == 0
    assert [r["provider"] for r in json.loads(merged.read_text())["records"]] == ["dense", "cat:0.5:2",
                                                                                 "cache-dit-dbcache"]  # fmt: skip
    merged_md = merged.with_suffix(".md").read_text()
    # the same table (a peer that could not run is listed under the table, with its error)
    assert [ln for ln in merged_md.splitlines() if ln.startswith("|")] == [ln for ln in md.splitlines()
                                                                           if ln.startswith("|")]  # fmt: skip
    assert "| CAT k=0.5 f=2 |" in merged_md and peer["name"] in merged_md


def _merge_module():
    spec = importlib.util.spec_from_file_location("bench_quality_merge", BENCH / "quality_merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(provider, **over):
    items = [dict(prompt="a red square", seed=0, psnr=30.0), dict(prompt="a red square", seed=1, psnr=31.0)]
    r = dict(provider=provider, model="tiny", shape=dict(items=2, steps=3), reference_cat="cat:0.3:8",
             target_mac_fraction=0.5, git_sha="abc", device="cpu", threads=1, dense_flops=10, per_item=items)
    r.update(over)
    return r


def test_quality_merge_refuses_runs_that_measured_different_things():
    merge = _merge_module()
    dense = _record("dense", per_item=None)
    run = [dense, _record("cat:0.3:8")]
    got = merge.merge([{"records": run}, {"records": [dense, _record("catf@cat:0.3:8")]}])
    assert [r["provider"] for r in got] == ["dense", "cat:0.3:8", "catf@cat:0.3:8"]
    bad = {
        "shape": [dense, _record("catf", shape=dict(items=2, steps=4))],
        "git_sha": [dict(dense, git_sha="def"), _record("catf")],
        "more than one run": [dense, _record("cat:0.3:8")],
        "other images": [dense, _record("catf", per_item=[dict(prompt="a blue circle", seed=0, psnr=1.0)] * 2)],
        "dense record": [_record("catf")],
        "reproduce": [dense, _record("catf", dense_reproducible=False)],
    }
    for why, second in bad.items():
        with pytest.raises(ValueError, match=why):
            merge.merge([{"records": run}, {"records": second}])


def test_quality_merge_across_commits_keeps_the_named_methods():
    merge = _merge_module()
    dense = _record("dense", per_item=None)
    old = {"records": [dense, _record("cat:0.3:8"), _record("catf@cat:0.2:8")]}
    new = {"records": [dict(dense, git_sha="def", threads=2), _record("catf@cat:0.2:8", git_sha="def", threads=2)]}
    with pytest.raises(ValueError, match="git_sha"):
        merge.merge([old, new])
    with pytest.raises(ValueError, match="threads"):
        merge.merge([old, {"records": [dict(dense, threads=2), _record("catf@cat:0.2:8", threads=2)]}])
    with pytest.raises(ValueError, match="more than one run"):  # the 44% row from both runs
        merge.merge([old, new], across_commits=True)
    got = merge.merge([old, new], across_commits=True, keep=[{"cat:0.3:8"}, None])
    assert [(r["provider"], r["git_sha"]) for r in got] == [("dense", "abc"), ("cat:0.3:8", "abc"),
                                                            ("catf@cat:0.2:8", "def")]  # fmt: skip
    with pytest.raises(ValueError, match="no method"):
        merge.merge([old, new], across_commits=True, keep=[{"cat:0.5:8"}, None])


def cat_config(params: dict, paper: bool = False):
    import cat_pruning

    return cat_pruning.CATConfig.paper(**params) if paper else cat_pruning.CATConfig(**params)


def test_method_specs(monkeypatch):
    """cat:K:F:field=value overrides take the CATConfig field's type; peer@cat:K:F is tuned to that setting."""
    import sys
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench_quality_specs", BENCH / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, quality)  # its dataclasses look their module up there
    spec.loader.exec_module(quality)

    def make(*specs):
        return quality.make_methods(SimpleNamespace(methods=list(specs), peer_warmup=8))

    clusters, importance, peer = make("cat:0.3:8:num_clusters=1", "cat:0.3:8:importance_fraction=0",
                                      "diffusers-taylorseer@cat:0.5:8")  # fmt: skip
    assert clusters.params["num_clusters"] == 1 and type(clusters.params["num_clusters"]) is int
    assert clusters.name == "CAT k=0.3 f=8 num_clusters=1" and clusters.group == "ablation"
    assert importance.params["importance_fraction"] == 0.0 and type(importance.params["importance_fraction"]) is float
    assert (peer.id, peer.matched_to, peer.group) == ("diffusers-taylorseer@cat:0.5:8", "cat:0.5:8", "peer")
    assert peer.name == "diffusers TaylorSeer @ cat:0.5:8"
    assert make("diffusers-taylorseer")[0].matched_to is None
    catf, budget = make("catf@mac:0.35", "cache-dit-dbcache@mac:0.35")
    assert (catf.group, catf.matched_to, catf.params["forecast"]) == ("catf", "mac:0.35", "taylor")
    assert catf.tune is not None and budget.matched_to == "mac:0.35"
    paper = make("cat:0.3:8")[0]  # the paper's CAT, whatever patch()'s defaults are
    assert cat_config(paper.params) == cat_config(dict(keep_ratio=0.3, full_steps=8), paper=True)
    for bad in ("diffusers-taylorseer@cat:0.5", "cat:0.3:8:num_clusters=0", "no-such-peer", "catf",
                "catf@mac:1.5", "diffusers-taylorseer@mac:x"):
        with pytest.raises((SystemExit, ValueError)):
            make(bad)


def test_catf_schedule_fraction(monkeypatch):
    """The MAC model the CAT-F tuning solves keep_ratio with: steps that run every token cost 1,
    pruned steps what the per-step model says."""
    import sys
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "quality_peers", raising=False)
    import quality_peers

    ctx = SimpleNamespace(steps=28)
    # full_steps 8, refresh every 3 from the fill step (7): steps 10, 13, ..., 25 refresh, 14 pruned
    assert quality_peers.catf_schedule_fraction(ctx, 8, 3, 100, lambda k: k / 200) == pytest.approx((14 + 7) / 28)
    assert quality_peers.catf_schedule_fraction(ctx, 8, 28, 100, lambda k: 0.25) == pytest.approx((8 + 5) / 28)
    # and the last step in full: 13 pruned
    frac = quality_peers.catf_schedule_fraction(ctx, 8, 3, 100, lambda k: k / 200, final_full_steps=1)
    assert frac == pytest.approx((15 + 6.5) / 28)


def test_catf_candidates_follow_the_band_rule(monkeypatch):
    """CAT-F candidates: for every refresh phase, K solved to land on the budget where the schedule
    can, else the nearest K, kept only within BAND of the budget (the rule the peers' schedules
    follow); the damped K/V forecast and the second-order output forecast only where refreshes are
    far apart / close."""
    import sys
    from types import SimpleNamespace

    import cat_pruning

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "quality_peers", raising=False)
    import quality_peers

    n, steps = 100, 28
    ctx = SimpleNamespace(steps=steps, target=0.45)
    step_fraction = lambda k: 0.05 + 0.9 * k / n  # noqa: E731
    got = quality_peers.catf_candidates(ctx, n, step_fraction)
    variants = {}
    for p, frac in got:
        assert abs(frac - ctx.target) <= quality_peers.BAND
        key = (p["full_steps"], p["refresh_every"], p["final_full_steps"], p["refresh_offset"], p["keep_ratio"])
        output = (p["output_cache"], p["forecast_order"], p["forecast_damping"], p.get("forecast_calibration", "none"))
        variants.setdefault(key, set()).add((p["forecast_kv_damping"], p["forecast_from"], output))
    for (full, every, final, offset, keep), d in variants.items():
        outputs = [(cache, *o, c) for cache in ("noise", "hidden") for o in quality_peers.CATF_OUTPUT_BY_CACHE[cache]
                   if o[0] == 1 or every in quality_peers.CATF_ORDER2_REFRESH
                   for c in ("none", "output") if c == "none" or (cache, *o) in quality_peers.CATF_CALIBRATED
                   ]  # fmt: skip
        kvs = [kv for kv in quality_peers.CATF_KV_DAMPING if kv == 1 or every >= quality_peers.CATF_DAMPED_REFRESH]
        assert d == {(kv, f, out) for kv in kvs for f in quality_peers.CATF_FORECAST_FROM for out in outputs}
        # the phase: the first refresh offset (or refresh_every) steps after the fill step
        cfg = cat_pruning.CATConfig(full_steps=full, refresh_every=every, refresh_offset=offset, final_full_steps=final)
        first = next(s for s in range(steps) if cfg.mode(s, steps) == "refresh")
        assert 0 <= offset < every and first == full - 1 + (offset or every)
        # K solved for this phase: one token more or less crosses the budget, unless K is at its bounds
        kept = round(keep * n)
        frac = quality_peers.catf_schedule_fraction(ctx, full, every, kept, step_fraction, refresh_offset=offset,
                                                    final_full_steps=final)
        nearer = [quality_peers.catf_schedule_fraction(ctx, full, every, k, step_fraction, refresh_offset=offset,
                                                       final_full_steps=final)
                  for k in (kept - 1, kept + 1) if 1 <= k <= n]  # fmt: skip
        assert all(abs(frac - ctx.target) <= abs(f - ctx.target) + 1e-12 for f in nearer)
    assert any(keep > 1 / n for *_, keep in variants) and any(keep == 1 / n for *_, keep in variants)
    schedules = {key[:4] for key in variants}
    for full, every, final in itertools.product(quality_peers.CATF_FULL, quality_peers.CATF_REFRESH,
                                                quality_peers.CATF_FINAL):
        for offset in range(every):
            one = quality_peers.catf_schedule_fraction(ctx, full, every, 1, step_fraction, refresh_offset=offset,
                                                       final_full_steps=final)
            reachable = one <= ctx.target  # K = 1 already costs more than the budget otherwise
            key = (full, every, final, offset)
            assert (key in schedules) == (reachable or one - ctx.target <= quality_peers.BAND)
            if key in schedules and not reachable:  # the nearest K: one token
                assert {k[4] for k in variants if k[:4] == key} == {1 / n}
    assert any(abs(f - ctx.target) < 0.005 for _, f in got)  # some schedules land on the budget
    # every phase of some schedules competes, and phases of one schedule may need different K
    phases = {}
    for full, every, final, offset, keep in variants:
        phases.setdefault((full, every, final), {})[offset] = keep
    assert any(len(ph) == every >= 4 for (_, every, _), ph in phases.items())
    assert any(len(set(ph.values())) > 1 for ph in phases.values())
    # one output cache only: the grid held to it
    hidden = quality_peers.catf_candidates(ctx, n, step_fraction, ("hidden",))
    assert hidden and [p for p, _ in hidden] == [p for p, _ in got if p["output_cache"] == "hidden"]
    assert {p["final_full_steps"] for p, _ in got} == set(quality_peers.CATF_FINAL)
    assert any(p["forecast_order"] == 2 for p, _ in got) and any(p["forecast_order"] == 1 for p, _ in got)
    # the calibrated output forecast competes, and each candidate is a valid CATConfig
    assert any(p.get("forecast_calibration") == "output" for p, _ in got)
    for p, _ in got:
        cat_pruning.CATConfig(**p)


def test_quality_parts_import_one_way():
    """The quality parts import each other in one direction only (any import, also inside a function
    or under TYPE_CHECKING): quality_methods -> quality_peers -> quality_measure -> quality_base."""
    import ast

    layers = ["quality_base", "quality_measure", "quality_peers", "quality_methods"]
    for i, name in enumerate(layers):
        tree = ast.parse((BENCH / f"{name}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert imported & set(layers) <= set(layers[:i]), (name, sorted(imported & set(layers)))


@pytest.mark.parametrize("grid", [5, 40, 200])
def test_pick_best_screens_a_large_grid_on_two_items_then_scores_the_best_on_all(monkeypatch, grid):
    """A grid larger than SCREEN_KEEP is scored on the first SCREEN_ITEMS tuning items; the best
    max(SCREEN_KEEP, grid / 8) go on to every item and the best mean there wins, even where the
    screening ranked it lower; a small grid is scored on every item at once."""
    import sys
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "quality_peers", raising=False)
    import quality_base
    import quality_peers

    rng = random.Random(grid)
    screen_score = {i: rng.random() for i in range(grid)}
    full_score = {i: rng.random() for i in range(grid)}
    calls = []

    def fake_tune_psnr(ctx, m, items=None):
        i = m.params["i"]
        calls.append((i, len(items if items is not None else ctx.tune_set)))
        return screen_score[i] if items is not None else full_score[i]

    monkeypatch.setattr(quality_peers, "tune_psnr", fake_tune_psnr)
    ctx = SimpleNamespace(target=0.5, tune_set=[("p", k) for k in range(8)])
    m = quality_base.Method("x", "x", "peer", {"fixed": 1}, session=None)
    quality_peers.pick_best(ctx, m, [({"i": i}, 0.5) for i in range(grid)], "schedule")
    keep = max(quality_peers.SCREEN_KEEP, grid // 8)
    if grid > keep:
        assert [c for c in calls if c[1] == quality_peers.SCREEN_ITEMS] == [(i, 2) for i in range(grid)]
        survivors = sorted(range(grid), key=screen_score.get, reverse=True)[:keep]
        assert sorted(i for i, n in calls if n == 8) == sorted(survivors)
        assert len(m.params["screening"]) == grid and len(m.params["tuning"]) == keep
        want = max(survivors, key=full_score.get)
    else:
        assert calls == [(i, 8) for i in range(grid)] and "screening" not in m.params
        want = max(range(grid), key=full_score.get)
    assert m.params["i"] == want and m.params["fixed"] == 1


@pytest.mark.parametrize("schedules", [10, 60, 200])
def test_pick_best_by_schedule_screens_schedules_then_their_settings_then_the_best_of_each(monkeypatch, schedules):
    """A grid of more than SCHEDULE_KEEP schedules: each schedule's representative is scored on
    the SCREEN_ITEMS tuning items, every setting of the best max(SCHEDULE_KEEP, schedules / 8)
    schedules there too (the representative not twice), and the best SETTINGS_KEEP settings of each
    of those schedules on every item, where the best mean wins; with fewer schedules it is
    pick_best over the band."""
    import sys
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "quality_peers", raising=False)
    import quality_base
    import quality_peers

    rng = random.Random(schedules)
    grid = [({"s": s, "f": f}, 0.5) for s in range(schedules) for f in range(4)]
    screen_score = {(p["s"], p["f"]): rng.random() for p, _ in grid}
    full_score = {(p["s"], p["f"]): rng.random() for p, _ in grid}
    generated = []  # (setting, tuning item) of every generation
    current = {}

    def session(pipe):
        return contextlib.nullcontext(None)

    def generate(ctx, item, reset=None):
        key = (m.params["s"], m.params["f"])
        generated.append((key, item[1]))
        current["score"] = screen_score[key] if item[1] < quality_peers.SCREEN_ITEMS else full_score[key]
        return [None]

    monkeypatch.setattr(quality_peers, "generate", generate)
    monkeypatch.setattr("cat_pruning.metrics.psnr", lambda image, dense: current["score"])
    items = [("p", k) for k in range(8)]
    ctx = SimpleNamespace(target=0.5, tune_set=items, tune_dense=dict.fromkeys(items), memo={}, bar=None, pipe=None)
    m = quality_base.Method("x", "x", "peer", {"fixed": 1}, session=session)
    quality_peers.pick_best_by_schedule(ctx, m, grid, "schedule", ("s",), lambda group: group[-1])
    assert len(generated) == len(set(generated)), "a setting was generated twice on the same item"
    scored_everywhere = {key for key, item in generated if item == 7}

    def mean(key):
        return statistics.fmean(screen_score[key] if i < 2 else full_score[key] for i in range(8))

    if schedules > quality_peers.SCHEDULE_KEEP:
        assert {(s, 3) for s in range(schedules)} <= {key for key, item in generated if item == 0}
        kept = sorted(range(schedules), key=lambda s: screen_score[(s, 3)], reverse=True)
        kept = kept[:max(quality_peers.SCHEDULE_KEEP, schedules // 8)]
        assert {s for (s, f), _ in generated if f < 3} == set(kept), "only the kept schedules' other settings"
        best = {s: sorted(((s, f) for f in range(4)), key=screen_score.get, reverse=True) for s in kept}
        assert scored_everywhere == {k for s in kept for k in best[s][:quality_peers.SETTINGS_KEEP]}
        assert len(m.params["schedule_screening"]) == schedules and len(m.params["screening"]) == 4 * len(kept)
    else:
        assert "schedule_screening" not in m.params
    assert (m.params["s"], m.params["f"]) == max(scored_everywhere, key=mean) and m.params["fixed"] == 1


@pytest.mark.parametrize(("before", "interval", "after"), [(2, 4, None), (5, 3, 27), (7, 2, 26), (3, 1, None),
                                                           (10, 14, 25)])
def test_taylorseer_schedule_rule_is_what_diffusers_hook_computes(monkeypatch, before, interval, after):
    """The quality bench counts a TaylorSeer schedule's computed steps by diffusers' rule
    (quality_peers.taylorseer_schedule_steps) once a generation has confirmed it for the peer's
    hooks; the rule must be the hook's: counted here on a toy block under the real hook."""
    pytest.importorskip("diffusers")
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    monkeypatch.syspath_prepend(str(BENCH))
    import quality_peers

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * 2

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block()])
    model.forward = lambda x: model.blocks[0](x)
    apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before,
                                                        disable_cache_after_step=after, max_order=1,
                                                        cache_identifiers=[r"blocks\.\d+"]))
    _set_cache_context(model, CacheContext("cond"))
    steps = 28
    for _ in range(steps):
        model.forward(torch.ones(2))
    want = model.blocks[0].calls
    assert 0 < want <= steps
    assert quality_peers.taylorseer_schedule_steps(steps, before, interval, after) == want


@pytest.mark.parametrize(("threshold", "skips", "retention"), [(0.06, 3, 0.2), (0.3, 2, 0.1), (0.01, 6, 0.3),
                                                               (5.0, 1, 0.2), (5.0, 6, 0.1)])
def test_magcache_schedule_rule_is_what_diffusers_hook_computes(monkeypatch, threshold, skips, retention):
    """The quality bench tunes diffusers' MagCache by its rule (quality_peers.magcache_schedule: which
    steps it computes for given ratios and knobs), checked once per run against a counted generation;
    here step by step on a tiny Wan transformer under the real hooks, with ratios on both sides of 1."""
    pytest.importorskip("diffusers")
    from diffusers.hooks import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.syspath_prepend(str(BENCH.parent / "tests" / "models"))
    import quality_peers
    from wan_models import inputs, tiny_wan

    steps = 28
    g = torch.Generator().manual_seed(int(threshold * 100) + skips)
    ratios = (1.0 + 0.08 * torch.randn(steps, generator=g)).tolist()
    model = tiny_wan()
    apply_mag_cache(model, MagCacheConfig(threshold=threshold, max_skip_steps=skips, retention_ratio=retention,
                                          num_inference_steps=steps, mag_ratios=ratios))  # fmt: skip
    calls = []
    model.blocks[0].attn1.to_q.register_forward_hook(lambda *_: calls.append(1))
    x = inputs(batch=1)
    _set_cache_context(model, CacheContext("cond"))
    computed = []
    for s in range(steps):
        before = len(calls)
        with torch.no_grad():
            model(**x, timestep=torch.tensor([1000.0 - s * 30]))
        computed.append(len(calls) > before)
    want = quality_peers.magcache_schedule(ratios, threshold, skips, retention)
    assert computed == want
    assert any(want) and (threshold < 1 or not all(want))  # the loose settings skip steps


def test_memo_resumes_tuning_psnrs_and_refuses_another_runs_file(monkeypatch, tmp_path):
    """--memo: the tuning PSNRs a run measured are in the file, read back exactly by a run with the
    same header (commit, model, steps, guidance, device), a cut-short last line skipped; other
    memoized values are not kept; a file from another run is refused."""
    monkeypatch.syspath_prepend(str(BENCH))
    import quality_measure

    header = dict(git="abc", model="video", steps=28, guidance=4.0, device="cpu")
    path = tmp_path / "memo.jsonl"
    memo = quality_measure.Memo(path, header)
    key = ("tune_psnr", "catf@mac:0.51", ("keep_ratio", "0.02"), repr(("a red circle", 1)))
    memo[key] = 31.25
    memo[("magcache", 28)] = ([1.0, 0.9], 0.1)  # not persisted: measured again on a resumed run
    with path.open("a") as f:
        f.write('[["tune_psnr", "x"], 1')  # a run stopped mid-write
    again = quality_measure.Memo(path, header)
    assert dict(again) == {key: 31.25}
    assert again.resumed == 1
    later = ("tune_psnr", "catf@mac:0.51", ("keep_ratio", "0.03"), repr(("a red circle", 1)))
    again[later] = 30.5  # written on a line of its own after the cut one
    assert dict(quality_measure.Memo(path, header)) == {key: 31.25, later: 30.5}
    with pytest.raises(SystemExit, match="another run"):
        quality_measure.Memo(path, {**header, "git": "def"})
