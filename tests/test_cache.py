"""The cache store (cat_pruning.cache) on its own: reuse and forecast of skipped rows, the step
schedule with refresh steps, and the forecast knobs' validation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cat_pruning import CATConfig
from cat_pruning.cache import ForecastStore, ReuseStore, make_store

B, H, N, D, C = 2, 3, 11, 5, 4


def _store(cls, **cfg):
    store = cls(CATConfig(backend="torch", **cfg))
    kv = {"layer": ((B, H, N, D), torch.float32)}
    extra = {"conv": ((B, C, N, 1), torch.float32)}
    store.allocate(kv, extra, ((B, N, C), torch.float32), torch.device("cpu"))
    return store


def _signals(seed: int, degree: int = 1):
    """Every cache row moving on a polynomial in time: value(t) = sum_i c_i t^i (a straight line
    for degree 1)."""
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(B, H, N, D, generator=g) for _ in range(degree + 1)]
    v = [torch.randn(B, H, N, D, generator=g) for _ in range(degree + 1)]
    x = [torch.randn(B, C, N, 1, generator=g) for _ in range(degree + 1)]
    o = [torch.randn(B, N, C, generator=g) for _ in range(degree + 1)]
    return lambda t, coeffs: sum(c * t**i for i, c in enumerate(coeffs)), (k, v, x, o)


def _steps(store, schedule, seed=0, pruned_offset=0.0, degree=1):
    """Runs the store through (mode, idx) steps on polynomial signals; yields (t, what it returned,
    truth). The rows a pruned step hands over are the truth + pruned_offset."""
    at, (k, v, x, o) = _signals(seed, degree)
    for t, (mode, idx) in enumerate(schedule):
        idx_t = None if idx is None else torch.tensor([idx, idx[::-1]]).sort(dim=1).values
        store.begin_step(mode, idx_t)

        def rows(full, dim, idx_t=idx_t):
            if idx_t is None:
                return full
            index = idx_t.view(B, *([1] * (dim - 1)), -1, 1).expand(*full.shape[:dim], idx_t.shape[1], full.shape[-1])
            return pruned_offset + full.gather(dim, index)

        truth = (at(t, k), at(t, v), at(t, x), at(t, o))
        got_k, got_v = store.kv("layer", rows(truth[0], 2), rows(truth[1], 2))
        got_x = store.rows("conv", rows(truth[2], 2))
        got_o = store.output(rows(truth[3], 1))
        store.end_step()
        store.advance()
        yield t, mode, (got_k, got_v, got_x, got_o), truth


SCHEDULE = [("anchor", None), ("fill", None), ("pruned", [0, 3, 7]), ("pruned", [1, 2, 9]), ("refresh", None),
            ("pruned", [4, 5, 10]), ("pruned", [0, 6, 8])]


def test_forecast_of_straight_lines_is_exact():
    store = _store(ForecastStore, forecast="taylor", forecast_damping=1.0, forecast_kv_damping=1.0)
    for t, mode, got, truth in _steps(store, SCHEDULE):
        for g, w in zip(got, truth, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"step {t} ({mode})")


@pytest.mark.parametrize("forecast_from", ["all", "refresh"])
def test_forecast_from_decides_whether_pruned_rows_feed_the_forecast(forecast_from):
    """Rows computed at pruned steps land off the line (+3). Under "refresh" the step reads them and
    the forecasts of later steps stay on the line drawn through the full and refresh steps;
    under "all" they enter the base and the slope, so a token's forecast leaves the line while one
    of its last two computations was off it."""
    store = _store(ForecastStore, forecast="taylor", forecast_damping=1.0, forecast_kv_damping=1.0,
                   forecast_from=forecast_from)
    off_line = torch.zeros(2, N, dtype=torch.bool)  # per token: its last two computations off the line?
    for t, mode, got, truth in _steps(store, SCHEDULE, pruned_offset=3.0):
        computed = SCHEDULE[t][1] if mode == "pruned" else list(range(N))
        skipped = [n for n in range(N) if n not in computed]
        for g, w in zip(got, truth, strict=True):
            dim = 2 if g.ndim == 4 else 1
            torch.testing.assert_close(g.index_select(dim, torch.tensor(computed)),
                                       w.index_select(dim, torch.tensor(computed)) + (3.0 if mode == "pruned" else 0),
                                       msg=f"step {t} ({mode}), computed rows")  # fmt: skip
            exact = [n for n in skipped if forecast_from == "refresh" or not off_line[:, n].any()]
            stale = [n for n in skipped if n not in exact]
            torch.testing.assert_close(g.index_select(dim, torch.tensor(exact, dtype=torch.long)),
                                       w.index_select(dim, torch.tensor(exact, dtype=torch.long)),
                                       msg=f"step {t} ({mode}), forecast rows")  # fmt: skip
            if stale:
                assert (g.index_select(dim, torch.tensor(stale)) - w.index_select(dim, torch.tensor(stale))
                        ).abs().min() > 1.0, f"step {t} ({mode}): off-line rows were not used"
        off_line[0, computed] = off_line[1, computed]
        off_line[1, computed] = mode == "pruned"


@pytest.mark.parametrize("order", [1, 2])
def test_second_order_output_forecast_of_parabolas_is_exact(order):
    """Signals on parabolas, unevenly sampled (pruned steps compute some tokens only). With
    forecast_order=2 every skipped output row whose token has three computations behind it is
    forecast exactly (Newton through them), the others first-order; at order 1 the same rows
    miss. The K/V rows stay first order either way."""
    store = _store(ForecastStore, forecast="taylor", forecast_damping=1.0, forecast_kv_damping=1.0,
                   forecast_order=order, forecast_from="all")  # every computation counts as one
    at, (_, _, _, o) = _signals(0, 2)

    def truth_at(step, n):
        return at(step, o)[:, n]

    times = [[] for _ in range(N)]  # per token: the steps it was computed at
    missed = 0.0
    for t, mode, got, truth in _steps(store, SCHEDULE, degree=2):
        computed = SCHEDULE[t][1] if mode == "pruned" else list(range(N))
        for n in range(N):
            row, want = got[3][:, n], truth[3][:, n]
            if n in computed:
                torch.testing.assert_close(row, want, rtol=0, atol=0, msg=f"step {t}, computed token {n}")
            elif len(times[n]) >= 3 and order == 2:
                torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-4, msg=f"step {t}, token {n}")
            elif len(times[n]) >= 2:  # first order through the last two: off by the curvature
                t1, t0 = times[n][-2:]
                line = truth_at(t0, n) + (truth_at(t0, n) - truth_at(t1, n)) * (t - t0) / (t0 - t1)
                torch.testing.assert_close(row, line, rtol=1e-4, atol=1e-4, msg=f"step {t}, token {n}")
                missed = max(missed, float((row - want).abs().max()))
        for n in computed:
            times[n].append(t)
    assert missed > 0.1  # the parabolas do bend: a first-order forecast misses them


def test_rebase_moves_the_value_and_keeps_the_slope():
    """forecast_from="rebase": a row computed at a pruned step (here off the line by +3) becomes its
    token's value, and its slope stays the one of the full and refresh steps, so the token's next
    forecast is the line shifted by +3, where "all" would draw a new slope through the offset row."""
    store = _store(ForecastStore, forecast="taylor", forecast_damping=1.0, forecast_kv_damping=1.0,
                   forecast_from="rebase", forecast_order=1)
    checked = 0
    for t, _mode, got, truth in _steps(store, SCHEDULE, pruned_offset=3.0):
        if t not in (3, 6):  # the pruned steps right after another pruned step
            continue
        rebased = SCHEDULE[t - 1][1]
        untouched = [n for n in range(N) if n not in rebased and n not in SCHEDULE[t][1]]
        for g, w in zip(got, truth, strict=True):
            dim = 2 if g.ndim == 4 else 1
            pick = torch.tensor(rebased)
            torch.testing.assert_close(g.index_select(dim, pick), w.index_select(dim, pick) + 3.0,
                                       msg=f"step {t}: rebased rows")
            if t == 3:  # every other skipped row still lies on the line of steps 0 and 1
                pick = torch.tensor(untouched)
                torch.testing.assert_close(g.index_select(dim, pick), w.index_select(dim, pick), msg=f"step {t}")
            checked += 1
    assert checked == 8


def test_rebase_of_parabolas_stays_exact():
    """forecast_order=2 with forecast_from="rebase", every computed row on the parabola: the output
    forecast from a rebased value uses the quadratic's secant (the span grows by twice the time
    since the slope's end), so every skipped output row from the first refresh on is exact, as
    is the curvature drawn across a rebase at the next refresh."""
    store = _store(ForecastStore, forecast="taylor", forecast_damping=1.0, forecast_kv_damping=1.0,
                   forecast_from="rebase", forecast_order=2)
    schedule = [*SCHEDULE, ("refresh", None), ("pruned", [1, 3, 5]), ("pruned", [2, 4, 9]), ("pruned", [0, 7, 10])]
    checked = 0
    for t, mode, got, truth in _steps(store, schedule, degree=2):
        if t > 4 and mode == "pruned":
            torch.testing.assert_close(got[3], truth[3], rtol=1e-4, atol=1e-4, msg=f"step {t}")
            checked += 1
    assert checked == 5


def test_reuse_returns_the_last_computed_rows():
    store = _store(ReuseStore)
    at, (k, v, x, o) = _signals(0)
    last = torch.zeros(N, dtype=torch.long)  # the step each token (same for both samples) was last computed
    for t, mode, got, _ in _steps(store, SCHEDULE[1:]):  # the reuse store keeps nothing at the anchor
        computed = SCHEDULE[1:][t][1] or range(N)
        last[list(computed)] = t
        want_o = torch.stack([at(int(s), o)[:, n] for n, s in enumerate(last)], 1)
        want_k = torch.stack([at(int(s), k)[:, :, n] for n, s in enumerate(last)], 2)
        assert torch.equal(got[3], want_o) and torch.equal(got[0], want_k), f"step {t} ({mode})"


def test_damping_and_horizon_shape_the_forecast():
    damped = _store(ForecastStore, forecast="taylor", forecast_damping=0.5, forecast_kv_damping=0.0, forecast_horizon=1)
    for t, _, got, _ in _steps(damped, SCHEDULE[:4]):
        if t == 3:  # token 4 was last computed at t=1: the output forecast moves half of one step, K/V none
            at, (k, v, x, o) = _signals(0)
            torch.testing.assert_close(got[3][:, 4], (at(1, o) + 0.5 * o[1])[:, 4], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[0][:, :, 4], at(1, k)[:, :, 4])


@pytest.mark.parametrize("order", [1, 2])
def test_skipped_rows_preview_what_the_next_pruned_step_reads(order):
    store = _store(ForecastStore, forecast="taylor", forecast_order=order)
    steps = _steps(store, SCHEDULE, degree=2)
    for _ in range(3):
        next(steps)
    preview = store.skipped_output()
    _, _, got, _ = next(steps)  # pruned, tokens 1, 2, 9 computed
    skipped = torch.ones(N, dtype=torch.bool)
    skipped[[1, 2, 9]] = False
    assert torch.equal(got[3][:, skipped], preview[:, skipped])


def test_make_store_and_schedule():
    assert type(make_store(CATConfig.paper())) is ReuseStore
    assert type(make_store(CATConfig())) is ForecastStore
    cfg = CATConfig(full_steps=4, refresh_every=3, final_full_steps=0)
    assert [cfg.mode(s) for s in range(10)] == ["dense", "dense", "anchor", "fill", "pruned", "pruned", "refresh",
                                               "pruned", "pruned", "refresh"]  # fmt: skip
    assert [CATConfig(full_steps=2).mode(s) for s in range(3)] == ["anchor", "fill", "pruned"]
    # refresh_offset: the first refresh that many steps after the fill step (3), then every 3;
    # 0 is refresh_every's phase, and an offset past refresh_every skips the refreshes before it
    def refreshes(**kw):
        c = CATConfig(full_steps=4, refresh_every=3, **kw)
        return [s for s in range(12) if c.mode(s) == "refresh"]

    assert refreshes(refresh_offset=0) == refreshes(refresh_offset=3) == [6, 9]
    assert refreshes(refresh_offset=1) == [4, 7, 10]
    assert refreshes(refresh_offset=5) == [8, 11]
    assert CATConfig(full_steps=4, refresh_every=3, refresh_offset=1).mode(3) == "fill"


@pytest.mark.parametrize("field, value", [("forecast", "linear"), ("refresh_every", -1),
                                          ("forecast_damping", 1.5), ("forecast_kv_damping", -0.1),
                                          ("forecast_horizon", -1), ("forecast_horizon", float("inf")),
                                          ("forecast_from", "pruned"), ("forecast_order", 3),
                                          ("refresh_offset", -1)])  # fmt: skip
def test_bad_forecast_knobs_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        CATConfig(**{field: value})


def test_taylor_forecast_without_refresh_steps_is_refused():
    """No refresh step lets every forecast drift to the end (14.7 dB against 23.2 for reuse)."""
    with pytest.raises(ValueError, match="refresh_every"):
        CATConfig(forecast="taylor", refresh_every=0)
    with pytest.raises(ValueError, match="refresh_every"):
        CATConfig.paper(forecast="taylor")
    assert CATConfig.paper().refresh_every == 0  # reuse without refresh steps is the paper


def test_final_full_steps_compute_the_last_steps_in_full():
    cfg = CATConfig(full_steps=4, refresh_every=3, final_full_steps=2)
    modes = [cfg.mode(s, 12) for s in range(12)]
    assert modes == ["dense", "dense", "anchor", "fill", "pruned", "pruned", "refresh", "pruned", "pruned",
                     "refresh", "refresh", "refresh"]  # fmt: skip
    assert [CATConfig(full_steps=4, refresh_every=3).mode(s, 12) for s in range(12)][:10] == modes[:10]
    assert [cfg.mode(s) for s in range(12)] == modes[:10] + ["pruned", "pruned"]  # the count unknown: no last steps


def test_refresh_offset_needs_refresh_steps():
    with pytest.raises(ValueError, match="refresh_offset"):
        CATConfig(refresh_every=0, refresh_offset=2)


def test_forecast_starting_at_the_fill_step_stays_finite(monkeypatch):
    """full_steps=2: the anchor is step 0, before any cache exists, so the fill step is the first the
    store sees. Whatever memory the buffers come from (here: NaN), it stores the fill rows with
    slope 0 and the first pruned step reuses them."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    store = _store(ForecastStore, forecast="taylor")
    monkeypatch.undo()
    schedule = [("fill", None), ("pruned", [0, 3, 7])]
    (_, _, fill, _), (_, _, pruned, truth) = list(_steps(store, schedule))
    for got, filled, want in zip(pruned, fill, truth, strict=True):
        assert torch.isfinite(got).all()
        dim = 2 if got.ndim == 4 else 1
        skipped = [i for i in range(N) if i not in (0, 3, 7)]
        torch.testing.assert_close(got.index_select(dim, torch.tensor(skipped)),
                                   filled.index_select(dim, torch.tensor(skipped)), rtol=0, atol=0)
        computed = torch.tensor([0, 3, 7])  # and the computed rows are this step's values
        torch.testing.assert_close(got.index_select(dim, computed), want.index_select(dim, computed), rtol=0, atol=0)


def test_refresh_phase_end_counts_the_refreshes_back_from_the_end():
    """refresh_phase="end": the last refresh lands on the step before the final full steps (or on
    the second-to-last step without them), whatever the step count; unknown count: the fill phase."""
    cfg = CATConfig(full_steps=7, refresh_every=3, refresh_phase="end", final_full_steps=1)
    assert [s for s in range(28) if cfg.mode(s, 28) == "refresh"] == [8, 11, 14, 17, 20, 23, 26, 27]
    assert [s for s in range(50) if cfg.mode(s, 50) == "refresh"][-3:] == [45, 48, 49]
    two = cfg.replace(final_full_steps=2)
    assert [s for s in range(20) if two.mode(s, 20) == "refresh"] == [8, 11, 14, 17, 18, 19]
    none = cfg.replace(final_full_steps=0)
    assert [s for s in range(20) if none.mode(s, 20) == "refresh"] == [9, 12, 15, 18]
    fill = cfg.replace(refresh_phase="fill", final_full_steps=0)
    assert [cfg.mode(s) for s in range(20)] == [fill.mode(s) for s in range(20)]
    assert cfg.needs_num_steps and not fill.needs_num_steps
    with pytest.raises(ValueError, match="refresh_offset"):
        CATConfig(refresh_phase="end", refresh_offset=1)


def test_the_paper_preset_has_no_final_full_step():
    """CATConfig.paper() is the published schedule: after the fill step every step is pruned."""
    assert [CATConfig.paper().mode(s, 28) for s in range(8, 28)] == ["pruned"] * 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("setting", ["float32", "cache", "float8"])
def test_slope_dtype_sets_every_slope_and_the_output_state(dtype, setting):
    """slope_dtype="cache" (the default): every cache's slope is stored in the cache's own dtype
    (with a bf16 model the forecast state is then twice the reuse caches, not three times), the
    output cache's curvature and forecast slope too; "float32": all fp32; "float8": the K/V
    slopes in fp8 rows, the others as with "cache". The forecast of a straight line is right to
    the dtype's rounding (and fp8's of the slope) either way, the output's (second order) too."""
    store = ForecastStore(CATConfig(backend="torch", slope_dtype=setting))
    kv = {"layer": ((B, H, N, D), dtype)}
    extra = {"conv": ((B, C, N, 1), dtype)}
    store.allocate(kv, extra, ((B, N, C), dtype), torch.device("cpu"))
    kv_slope = torch.float32 if setting == "float32" else dtype
    want = {"extra/conv": kv_slope, "noise": kv_slope}
    if setting != "float8":
        want.update({"layer/k": kv_slope, "layer/v": kv_slope})
    assert {name: t.dtype for name, t in store.slopes.items()} == want
    assert sorted(store.slopes8) == (["layer/k", "layer/v"] if setting == "float8" else [])
    assert store.curv.dtype == store.slope_read.dtype == kv_slope
    g = torch.Generator().manual_seed(5)
    k0, k1 = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    o0, o1 = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    for t, mode in enumerate(["anchor", "fill", "refresh", "pruned"]):
        pruned = mode == "pruned"
        store.begin_step(mode, torch.tensor([[0, 1], [0, 1]]) if pruned else None)  # tokens 0 and 1 computed
        key, out = (k0 + t * k1).to(dtype), (o0 + t * o1).to(dtype)
        rows = key[:, :, :2] if pruned else key
        got, _ = store.kv("layer", rows, rows)
        got_out = store.output(out[:, :2] if pruned else out)
        store.end_step()
        store.advance()
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    # the output's damped (0.85) second-order forecast of a line: 0.85 of the last step's move
    torch.testing.assert_close(got_out[:, 4:].float(), (o0 + 2.85 * o1)[:, 4:], rtol=0, atol=tol * 4)
    skipped = got[:, :, 4:].float()
    if setting == "float8":  # e4m3 keeps 3 mantissa bits of the slope k1: within 2^-4 of it
        assert ((skipped - (k0 + 3 * k1)[:, :, 4:]).abs() <= tol * 4 + 2**-4 * k1[:, :, 4:].abs()).all()
    else:
        torch.testing.assert_close(skipped, (k0 + 3 * k1)[:, :, 4:], rtol=0, atol=tol * 4)


@pytest.mark.parametrize("order", [1, 2])
def test_calibration_fits_the_step_a_damped_forecast_misses(order):
    """Straight lines, the output forecast damped to 0.8 of the step: without calibration a skipped
    token lands short of its line; forecast_calibration="output" fits the multiplier 1/0.8 on the
    computed tokens and puts every skipped token on it. The K/V forecasts are not calibrated."""
    def outputs(calibration):
        store = _store(ForecastStore, forecast="taylor", forecast_damping=0.8, forecast_kv_damping=0.8,
                       forecast_order=order, forecast_calibration=calibration)
        return [(mode, got, truth) for _, mode, got, truth in _steps(store, SCHEDULE)]

    for (mode, got, truth), (_, plain, _) in zip(outputs("output"), outputs("none"), strict=True):
        if mode != "pruned":
            continue
        torch.testing.assert_close(got[3], truth[3], rtol=1e-5, atol=1e-5)
        assert (plain[3] - truth[3]).abs().amax() > 0.1  # the damped forecast misses
        torch.testing.assert_close(got[0], plain[0])  # K/V as without calibration


def test_calibration_is_least_squares_over_distinct_computed_tokens_and_clamped():
    """Random rows: the skipped output rows of a pruned step are base + m x (forecast - base) with
    m = <new - base, forecast - base> / |forecast - base|^2 over the computed tokens, clamped to
    [0, 1.5]; a token repeated after the selection (context-parallel padding) counts once."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(B, N, C, generator=g) for _ in range(3)]

    def run(idx, scale):
        store = _store(ForecastStore, forecast="taylor", forecast_order=1, forecast_damping=1.0,
                       forecast_calibration="output")
        for t, mode in enumerate(["anchor", "fill", "pruned"]):
            sel = torch.tensor([idx, idx]) if mode == "pruned" else None
            store.begin_step(mode, sel, 3 if mode == "pruned" else None)  # the selection: 3 tokens
            if mode == "pruned":
                forecast = store.forecast_output()
                new = rows[0] + scale * (forecast - rows[0]) + 0.3 * rows[2]  # off the forecast's line
                new = new[:, idx]
            else:
                new = rows[0] + t * (rows[1] - rows[0])
            for name in store.kv_cache:
                shape = (B, H, len(idx) if sel is not None else N, D)
                store.kv(name, torch.zeros(shape), torch.zeros(shape))
            store.rows("conv", torch.zeros(B, C, len(idx) if sel is not None else N, 1))
            out = store.output(new)
            store.end_step()
            store.advance()
        return forecast, new, out

    for scale in (0.6, 5.0, -2.0):
        forecast, new, out = run([1, 4, 6], scale)
        base, step = rows[1], forecast - rows[1]
        distinct = [1, 4, 6]
        fit = ((new - base[:, distinct]) * step[:, distinct]).sum((1, 2)) / step[:, distinct].square().sum((1, 2))
        fit = fit.clamp(0.0, 1.5)
        skipped = [n for n in range(N) if n not in distinct]
        want = base + fit[:, None, None] * step
        torch.testing.assert_close(out[:, skipped], want[:, skipped], rtol=1e-5, atol=1e-5)
        w = 0.5 + 0.5 * 3 / N  # computed_weight's default, 3 of N tokens computed
        torch.testing.assert_close(out[:, distinct], forecast[:, distinct] + w * (new - forecast[:, distinct]))
        _, _, repeated = run([1, 4, 6, 6], scale)  # token 6 twice, with the same row
        torch.testing.assert_close(repeated, out, rtol=0, atol=0)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_computed_rows_move_the_output_from_its_forecast_by_computed_weight(weight, order):
    """At a pruned step the output cache reads forecast + w (computed - forecast) for the K of N
    tokens computed, w = computed_weight + (1 - computed_weight) K / N, and the forecast for the
    others; with every token computed it reads the computed rows as they are."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(B, N, C, generator=g) for _ in range(4)]

    def pruned_step(idx):
        store = _store(ForecastStore, forecast="taylor", forecast_order=order, computed_weight=weight)
        for t, mode in enumerate(["anchor", "fill", "refresh", "pruned"]):
            sel = torch.tensor([idx, idx]) if mode == "pruned" else None
            store.begin_step(mode, sel, len(idx) if mode == "pruned" else None)
            n = len(idx) if sel is not None else N
            for name in store.kv_cache:
                store.kv(name, torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g))
            store.rows("conv", torch.randn(B, C, n, 1, generator=g))
            if mode == "pruned":
                forecast = store.forecast_output()
            out = store.output(rows[t][:, idx] if mode == "pruned" else rows[t])
            store.end_step()
            store.advance()
        return forecast, out

    idx = [0, 3, 4, 9]
    forecast, out = pruned_step(idx)
    skipped = [n for n in range(N) if n not in idx]
    torch.testing.assert_close(out[:, skipped], forecast[:, skipped], rtol=0, atol=0)
    w = weight + (1 - weight) * len(idx) / N
    want = forecast[:, idx] + w * (rows[3][:, idx] - forecast[:, idx])
    torch.testing.assert_close(out[:, idx], want, rtol=1e-6, atol=1e-6)
    assert (rows[3][:, idx] - forecast[:, idx]).abs().amax() > 0.1  # the forecast misses the computed rows
    _, every = pruned_step(list(range(N)))
    torch.testing.assert_close(every, rows[3], rtol=0, atol=0)


def test_computed_weight_is_a_taylor_knob():
    """computed_weight weighs a computed row against its forecast: without a forecast it is refused."""
    with pytest.raises(ValueError, match="computed_weight"):
        CATConfig(forecast="none", computed_weight=0.3)
    with pytest.raises(ValueError, match="computed_weight"):
        CATConfig(computed_weight=1.5)


@pytest.mark.parametrize("kw", [dict(forecast_from="all"), dict(forecast="none"), dict(forecast_calibration="kv")])
def test_calibration_needs_a_taylor_forecast_that_pruned_rows_do_not_feed(kw):
    with pytest.raises(ValueError, match="forecast_calibration"):
        CATConfig(**{"forecast_calibration": "output", "refresh_every": 3, **kw})


# ---------------------------------------------------------------------- kv_dtype="float8"


def _heads_of_many_scales(seed: int, shape: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """Random rows whose heads differ in magnitude by up to 10^6 (so one scale per row would lose
    the small heads)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).unflatten(-1, (-1, head_dim))
    scales = 10.0 ** torch.randint(-3, 4, (*x.shape[:-1], 1), generator=g).float()
    return (x * scales).flatten(-2)


def _float8_rows(shape, head_dim, dtype=torch.float32):
    from cat_pruning.cache import FLOAT8, Float8Rows

    data = torch.empty(shape, dtype=FLOAT8)
    scale = torch.empty(*shape[:-1], shape[-1] // head_dim)
    return Float8Rows(data, scale, head_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_float8_rows_keep_each_head_to_e4m3_precision(dtype):
    """Every head of every row round-trips within e4m3's rounding of its own magnitude: half a
    unit in the last of 3 mantissa bits (2^-4 relative), or half the subnormal step (2^-10 of
    the head's scale) near zero; plus the dtype's own rounding of the result."""
    shape, head_dim = (2, 13, 4 * 6), 6
    x = _heads_of_many_scales(1, shape, head_dim).to(dtype)
    rows = _float8_rows(shape, head_dim, dtype)
    rows.store_(x)
    got = rows.dequantized()
    assert got.dtype == dtype and rows.data.dtype == torch.float8_e4m3fn
    scale = rows.scale.repeat_interleave(head_dim, -1)
    eps = torch.finfo(dtype).eps
    bound = (x.float().abs() * 2**-4 + scale * 2**-10) * (1 + eps) + got.float().abs() * eps
    assert ((got.float() - x.float()).abs() <= bound).all()
    # the largest magnitude of each head is stored as e4m3's largest finite value
    assert torch.equal(rows.data.float().abs().unflatten(-1, (-1, head_dim)).amax(-1),
                       torch.full(rows.scale.shape, 448.0))


def test_float8_rows_quantize_each_head_alone_so_a_rank_with_half_the_heads_stores_the_same():
    """Context parallelism splits a (B, N, H*D) cache by heads: the heads a rank holds must
    quantize to the same bytes and scales as in one process."""
    shape, head_dim = (2, 9, 4 * 8), 8
    x = _heads_of_many_scales(2, shape, head_dim)
    whole, half = _float8_rows(shape, head_dim), _float8_rows((2, 9, 2 * 8), head_dim)
    whole.store_(x)
    half.store_(x[..., 16:])
    assert torch.equal(whole.data[..., 16:].view(torch.uint8), half.data.view(torch.uint8))
    assert torch.equal(whole.scale[..., 2:], half.scale)


@pytest.mark.parametrize("layout", ["flat", "heads"])
def test_float8_rows_scatter_writes_the_selected_rows_only(layout):
    shape, head_dim, dim = ((B, N, H * D), D, 1) if layout == "flat" else ((B, H, N, D), D, 2)
    old, new = _heads_of_many_scales(3, shape, head_dim), _heads_of_many_scales(4, shape, head_dim)
    rows, want = _float8_rows(shape, head_dim), _float8_rows(shape, head_dim)
    rows.store_(old)
    idx = torch.tensor([[1, 4, 10], [0, 4, 7]])
    index = idx.view(B, *([1] * (dim - 1)), 3, 1).expand(*shape[:dim], 3, shape[-1])
    rows.scatter_(idx, new.gather(dim, index), dim)
    mixed = old.clone()
    mixed.scatter_(dim, index, new.gather(dim, index))
    want.store_(mixed)
    assert torch.equal(rows.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(rows.scale, want.scale)


@pytest.mark.parametrize("kv_dtype", ["float8", "float8-values"])
@pytest.mark.parametrize("cls", [ReuseStore, ForecastStore])
def test_float8_kv_caches_take_a_byte_per_element_and_attend_computed_rows_exactly(cls, kv_dtype):
    """kv_dtype="float8": K/V rows (and with slope_dtype="cache" their slopes) are fp8 with
    per-head scales ("float8-values": V only, K in the model's dtype); a pruned step's computed
    rows are returned as given, the others as the store dequantizes them (what skipped_kv
    previews)."""
    store = cls(CATConfig(backend="torch", kv_dtype=kv_dtype, forecast="taylor" if cls is ForecastStore else "none",
                          **({} if cls is ForecastStore else dict(refresh_every=0))))
    shape = (B, N, H * D)  # a flat (B, N, H*D) cache, as Flux's
    store.allocate({"layer": (shape, torch.bfloat16)}, {}, ((B, N, C), torch.bfloat16), torch.device("cpu"),
                   head_dims={"layer": D})
    k_dtype = torch.float8_e4m3fn if kv_dtype == "float8" else torch.bfloat16
    assert [t.dtype for t in store.kv_cache["layer"]] == [k_dtype, torch.float8_e4m3fn]
    assert sorted(store.float8) == (["layer/k", "layer/v"] if kv_dtype == "float8" else ["layer/v"])
    if cls is ForecastStore:
        assert sorted(store.slopes8) == sorted(store.float8)
        assert kv_dtype == "float8" or store.slopes["layer/k"].dtype == torch.bfloat16
    g = torch.Generator().manual_seed(6)
    idx = torch.tensor([[2, 5], [3, 5]])
    modes = ["anchor", "fill", "pruned", "pruned"] if cls is ForecastStore else ["fill", "pruned", "pruned"]
    for mode in modes:
        key, value = (torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(2))
        pruned = mode == "pruned"
        store.begin_step(mode, idx if pruned else None)
        if pruned:
            want_k, want_v = store.skipped_kv("layer")
            index = idx.unsqueeze(-1).expand(B, 2, H * D)
            key, value = key.gather(1, index), value.gather(1, index)
            want_k.scatter_(1, index, key)
            want_v.scatter_(1, index, value)
        got_k, got_v = store.kv("layer", key, value)
        if pruned:
            torch.testing.assert_close(got_k, want_k, rtol=0.01, atol=0.02)
            torch.testing.assert_close(got_v, want_v, rtol=0.01, atol=0.02)
            assert torch.equal(got_k.gather(1, index), key) and torch.equal(got_v.gather(1, index), value)
        store.end_step()
        store.advance()


def test_float8_needs_head_sizes_and_the_refresh_forecast():
    store = ReuseStore(CATConfig(backend="torch", forecast="none", refresh_every=0, kv_dtype="float8"))
    with pytest.raises(ValueError, match="head size"):
        store.allocate({"layer": ((B, N, H * D), torch.bfloat16)}, {}, ((B, N, C), torch.bfloat16),
                       torch.device("cpu"))
    for forecast_from, kv_dtype in itertools.product(("all", "rebase"), ("float8", "float8-values")):
        with pytest.raises(ValueError, match="forecast_from"):
            CATConfig(kv_dtype=kv_dtype, forecast_from=forecast_from)
    with pytest.raises(ValueError, match="kv_dtype"):
        CATConfig(kv_dtype="fp8")


def test_float8_rows_with_fp32_slopes_keep_the_slope_in_fp32():
    """kv_dtype="float8" with slope_dtype="float32": the values are fp8, the slopes fp32 and
    taken in fp32 (new row minus the dequantized value), not rounded to the model's dtype first."""
    store = ForecastStore(CATConfig(backend="torch", kv_dtype="float8", slope_dtype="float32"))
    store.allocate({"layer": ((B, H, N, D), torch.bfloat16)}, {}, ((B, N, C), torch.bfloat16), torch.device("cpu"))
    assert store.slopes["layer/k"].dtype == torch.float32 and not store.slopes8
    g = torch.Generator().manual_seed(8)
    rows = [torch.randn(B, H, N, D, generator=g).to(torch.bfloat16) for _ in range(2)]
    for mode, key in zip(["anchor", "fill"], rows, strict=True):
        store.begin_step(mode, None)
        store.kv("layer", key, key)
        store.end_step()
        store.advance()
    # the stored value the slope starts from: the anchor row in fp8, dequantized to bf16
    anchor = _float8_rows((B, H, N, D), D, torch.bfloat16)
    anchor.store_(rows[0])
    want = rows[1].float() - anchor.dequantized().float()
    assert torch.equal(store.slopes["layer/k"], want)


@pytest.mark.parametrize("layout", ["bhnd", "flat"])
def test_float8_slopes_keep_values_in_the_model_dtype_and_forecast_from_fp8_slopes(layout):
    """slope_dtype="float8": the K/V values stay bf16, their slopes are fp8 with per-head scales
    (stored as the fill step's change per step rounds to e4m3); a pruned step reads value +
    weight x dequantized slope, with its computed rows exact, as skipped_kv previews; the state
    is smaller than with bf16 slopes."""
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H * D)
    dim = 2 if layout == "bhnd" else 1

    def store_for(slope_dtype, layers=1):
        store = ForecastStore(CATConfig(backend="torch", slope_dtype=slope_dtype))
        names = ["layer", *(f"layer{i}" for i in range(1, layers))]
        store.allocate({n: (shape, torch.bfloat16) for n in names}, {}, ((B, N, C), torch.bfloat16),
                       torch.device("cpu"), head_dims=dict.fromkeys(names, D))
        return store

    # a layer more holds its bf16 K and V, and per element of each a byte of slope and its head's fp32 scale
    numel = B * N * H * D
    for slope_dtype, per_element in (("float8", 2 * (2 + 1 + 4 / D)), ("cache", 2 * (2 + 2))):
        assert store_for(slope_dtype, 3).nbytes() - store_for(slope_dtype, 2).nbytes() == numel * per_element
    store = store_for("float8")
    assert [t.dtype for t in store.kv_cache["layer"]] == [torch.bfloat16, torch.bfloat16]
    assert sorted(store.slopes8) == ["layer/k", "layer/v"] and not store.float8
    assert "layer/k" not in store.slopes and store.slopes["noise"].dtype == torch.bfloat16
    g = torch.Generator().manual_seed(9)
    rows = [torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(4)]
    idx = torch.tensor([[1, 7], [4, 7]])
    for step, mode in enumerate(["anchor", "fill", "pruned", "pruned"]):
        key, value = rows[step], -rows[step]
        store.begin_step(mode, idx if mode == "pruned" else None)
        if mode == "pruned":
            want_k, want_v = store.skipped_kv("layer")
            index = idx.view(B, *([1] * (dim - 1)), 2, 1).expand(*shape[:dim], 2, shape[-1])
            key, value = key.gather(dim, index), value.gather(dim, index)
            want_k.scatter_(dim, index, key)
            want_v.scatter_(dim, index, value)
        got_k, got_v = store.kv("layer", key, value)
        if mode == "fill":  # one step after the anchor: the slope is the change, rounded to fp8 per head
            want = _float8_rows(shape, D, torch.bfloat16)
            want.store_(rows[1] - rows[0])
            assert torch.equal(store.slopes8["layer/k"].data.view(torch.uint8), want.data.view(torch.uint8))
            assert torch.equal(store.slopes8["layer/k"].scale, want.scale)
            assert torch.equal(store.kv_cache["layer"][0], rows[1])
        if mode == "pruned":
            torch.testing.assert_close(got_k, want_k, rtol=0.01, atol=0.02)
            torch.testing.assert_close(got_v, want_v, rtol=0.01, atol=0.02)
            assert torch.equal(got_k.gather(dim, index), key) and torch.equal(got_v.gather(dim, index), value)
            assert not torch.equal(got_k, store.kv_cache["layer"][0])  # the skipped rows moved by their slope
        store.end_step()
        store.advance()


def test_float8_slopes_need_the_refresh_forecast():
    for forecast_from in ("all", "rebase"):
        with pytest.raises(ValueError, match="slope_dtype"):
            CATConfig(slope_dtype="float8", forecast_from=forecast_from)
    store = ForecastStore(CATConfig(backend="torch", slope_dtype="float8"))
    with pytest.raises(ValueError, match="head size"):
        store.allocate({"layer": ((B, N, H * D), torch.bfloat16)}, {}, ((B, N, C), torch.bfloat16),
                       torch.device("cpu"))


# ---------------------------------------------------------------------- fused_attention


@pytest.mark.parametrize("forecast", ["taylor", "none"])
@pytest.mark.parametrize("layout", ["bhnd", "flat"])
def test_fused_attention_attends_what_the_unfused_step_reads(layout, forecast):
    """fused_attention: a pruned step's store.attend(q, computed rows, text) equals SDPA over the
    rows an unfused store's joint_kv returns for the same steps (fp32, within rounding), for
    (B, H, N, D) and (B, N, H * D) caches, with repeated padding columns after `kept` attended
    once. The forecast store holds no K/V read buffer (its bytes are the unfused store's less
    those) and leaves value and slope as the fill step stored them."""
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H * D)
    dim = 2 if layout == "bhnd" else 1
    knobs = dict(backend="torch", forecast=forecast) | ({} if forecast == "taylor" else dict(refresh_every=0))
    stores = [make_store(CATConfig(**knobs, fused_attention=fused)) for fused in (False, True)]
    for store in stores:
        store.allocate({"layer": (shape, torch.float32)}, {}, ((B, N, C), torch.float32), torch.device("cpu"))
    fused = stores[1]
    if forecast == "taylor":
        assert not fused.reads and not fused.wide
        read = sum(stores[0].reads[f"layer/{part}"].nbytes for part in "kv")
        assert read and fused.nbytes() == stores[0].nbytes() - read
    g = torch.Generator().manual_seed(21)
    idx = torch.tensor([[1, 7, 9, 1], [4, 7, 10, 4]])  # 3 selected, then a padding repeat of the first
    text = [torch.randn(B, H, 3, D, generator=g) for _ in range(2)]
    for mode in ["anchor", "fill", "pruned", "pruned"]:
        rows = [torch.randn(*shape, generator=g) for _ in range(2)]
        q = torch.randn(B, H, 6, D, generator=g)
        for store in stores:
            store.begin_step(mode if forecast == "taylor" or mode != "anchor" else "fill",
                             idx if mode == "pruned" else None, 3 if mode == "pruned" else None)
        if mode != "pruned":
            for store in stores:
                store.kv("layer", *rows)
        else:
            index = idx.view(B, *([1] * (dim - 1)), 4, 1).expand(*shape[:dim], 4, shape[-1])
            computed = [r.gather(dim, index) for r in rows]
            if forecast == "taylor":
                before = [t.clone() for t in (*fused.kv_cache["layer"], fused.slopes["layer/k"])]
            k, v = stores[0].joint_kv("layer", *computed, after=(_flat(text[0], layout), _flat(text[1], layout)))
            want = F.scaled_dot_product_attention(q, *(_heads(x) for x in (k, v)))
            got = fused.attend("layer", q, *computed, [tuple(text)])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if forecast == "taylor":
                for t, was in zip((*fused.kv_cache["layer"], fused.slopes["layer/k"]), before, strict=True):
                    assert torch.equal(t, was)
        for store in stores:
            store.end_step()
            store.advance()


def _flat(x, layout):
    """(B, H, T, D) text rows in a cache's layout."""
    return x if layout == "bhnd" else x.transpose(1, 2).flatten(2)


def _heads(x):
    return x if x.dim() == 4 else x.unflatten(-1, (H, D)).transpose(1, 2)


def test_fused_attention_joined_rows_are_the_concatenated_ones():
    """ForecastStore.attend(joined=...): the call's own [text; computed; reference] rows attended
    as one view give what the computed rows joined to the extra rows by a copy give, a text mask
    included (fp32, within rounding: only the keys' order differs); a joined pair of the wrong
    length is refused."""
    store = make_store(CATConfig(backend="torch", fused_attention=True))
    shape = (B, H, N, D)
    store.allocate({"layer": (shape, torch.float32)}, {}, ((B, N, C), torch.float32), torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    idx = torch.tensor([[1, 7, 9], [4, 7, 10]])
    for mode in ["anchor", "fill", "pruned"]:
        store.begin_step(mode, idx if mode == "pruned" else None, 3 if mode == "pruned" else None)
        if mode != "pruned":
            store.kv("layer", *(torch.randn(*shape, generator=g) for _ in range(2)))
            store.end_step()
            store.advance()
    call = [torch.randn(B, H, 4 + 3 + 2, D, generator=g) for _ in range(2)]  # [text; computed; reference]
    text, computed, reference = (tuple(x[:, :, a:b] for x in call) for a, b in ((0, 4), (4, 7), (7, 9)))
    mask = torch.tensor([[True, False, True, True, True, True], [True, True, True, False, False, True]])
    q = torch.randn(B, H, 6, D, generator=g)
    for extra_mask in (None, mask):
        want = store.attend("layer", q, *computed, [text, reference], extra_mask)
        got = store.attend("layer", q, *computed, [text, reference], extra_mask, joined=(*call, 4))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="joined 8 rows"):
        store.attend("layer", q, *computed, [text, reference], joined=(*(x[:, :, :8] for x in call), 4))
