"""The public ops reject bad arguments with errors that name them; backend choice; torch.compile."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cat_kernels import backend, ops


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _stats_args(B=2, N=10, C=8, nc=4, seed=0):
    g = _gen(seed)
    out, anchor = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    return out, anchor, torch.randint(0, nc, (B, N), generator=g)


def _select_args(B=2, N=10, nc=4, seed=1):
    g = _gen(seed)
    return (
        torch.rand(B, N, generator=g) + 0.01,
        torch.rand(B, nc, generator=g) + 0.01,
        torch.randint(0, nc, (B, N), generator=g),
        torch.rand(B, N, generator=g) + 0.01,
    )


def test_token_stats_errors():
    out, anchor, labels = _stats_args()
    with pytest.raises(ValueError, match="out"):
        ops.token_stats(out[0], anchor, labels, 4)
    with pytest.raises(ValueError, match="anchor"):
        ops.token_stats(out, anchor.double(), labels, 4)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels.float(), 4)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels + 4, 4)  # outside [0, num_clusters)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels - 1 - labels.max(), 4)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels[:1], 4)  # batch mismatch
    with pytest.raises(ValueError, match="anchor"):
        ops.token_stats(out, anchor.to("meta"), labels, 4)  # device mismatch
    with pytest.raises(ValueError, match="num_clusters"):
        ops.token_stats(out, anchor, labels, 0)


def test_select_tokens_errors():
    d, score, labels, stale = _select_args()
    with pytest.raises(ValueError, match="k must"):
        ops.select_tokens(d, score, labels, stale, 0, first=True)
    with pytest.raises(ValueError, match="k must"):
        ops.select_tokens(d, score, labels, stale, 11, first=True)
    with pytest.raises(ValueError, match="d must"):
        ops.select_tokens(d[0], score, labels, stale, 3, first=True)
    with pytest.raises(ValueError, match="staleness"):
        ops.select_tokens(d, score, labels, stale.half(), 3, first=True)
    with pytest.raises(ValueError, match="batch sizes"):
        ops.select_tokens(d, score[:1], labels, stale, 3, first=True)
    with pytest.raises(ValueError, match="labels"):
        ops.select_tokens(d, score, labels + 4, stale, 3, first=True)
    with pytest.raises(ValueError, match="staleness"):
        ops.select_tokens(d, score, labels, stale.to("meta"), 3, first=True)


def test_gather_scatter_errors():
    g = _gen(2)
    x = torch.randn(2, 10, 8, generator=g)
    idx = torch.randint(0, 10, (2, 4), generator=g)
    with pytest.raises(ValueError, match="idx"):
        ops.gather_tokens(x, idx.float())
    with pytest.raises(ValueError, match="idx"):
        ops.gather_tokens(x, idx + 10)
    with pytest.raises(ValueError, match="dim"):
        ops.gather_tokens(x, idx, dim=2)
    with pytest.raises(ValueError, match="batch sizes"):
        ops.gather_tokens(x, idx[:1])
    with pytest.raises(ValueError, match="idx"):
        ops.gather_tokens(x, idx.to("meta"))
    src = torch.randn(2, 4, 8, generator=g)
    with pytest.raises(ValueError, match="src"):
        ops.scatter_tokens_(x, idx, src[:, :3])
    with pytest.raises(ValueError, match="dst"):
        ops.scatter_tokens_(x.int(), idx, src)
    kc = torch.randn(2, 3, 10, 8, generator=g)
    k = torch.randn(2, 3, 4, 8, generator=g)
    with pytest.raises(ValueError, match="v_cache"):
        ops.scatter_kv_(kc, kc[:, :2], idx, k, k[:, :2])
    with pytest.raises(ValueError, match="v must|v "):
        ops.scatter_kv_(kc, kc.clone(), idx, k, k[:, :, :3])
    with pytest.raises(ValueError, match="features"):
        ops.kmeans(torch.randn(10, 3, generator=g), 4)


def test_backend_errors(monkeypatch):
    out, anchor, labels = _stats_args()
    with pytest.raises(ValueError, match="backend"):
        ops.token_stats(out, anchor, labels, 4, backend="nope")
    if not backend.extension_available():
        with pytest.raises(RuntimeError, match="extension"):
            ops.token_stats(out, anchor, labels, 4, backend="cuda")
    monkeypatch.setattr(backend, "_EXTENSION", None)
    with pytest.raises(RuntimeError, match="extension"):
        ops.token_stats(out, anchor, labels, 4, backend="cuda")


def test_torch_compile_fullgraph_matches_eager():
    out, anchor, labels = _stats_args(B=2, N=40, C=16, nc=5, seed=3)
    g = _gen(4)
    stale = torch.rand(2, 40, generator=g) + 0.01
    k_cache = torch.randn(2, 3, 40, 8, generator=g)
    v_cache = torch.randn(2, 3, 40, 8, generator=g)
    k_new = torch.randn(2, 3, 12, 8, generator=g)
    v_new = torch.randn(2, 3, 12, 8, generator=g)

    def step(out, anchor, labels, stale, k_cache, v_cache):
        d, score = ops.token_stats(out, anchor, labels, 5, backend="torch")
        idx = ops.select_tokens(d, score, labels, stale, 12, first=False, backend="torch")
        rows = ops.gather_tokens(out, idx, 1, backend="torch")
        ops.scatter_kv_(k_cache, v_cache, idx, k_new, v_new, 2, backend="torch")
        return idx, rows

    args = (out, anchor, labels, stale, k_cache, v_cache)
    eager_args = [a.clone() for a in args]
    compiled_args = [a.clone() for a in args]
    torch._dynamo.reset()
    idx_c, rows_c = torch.compile(step, fullgraph=True, backend="eager")(*compiled_args)
    idx_e, rows_e = step(*eager_args)
    assert torch.equal(idx_c, idx_e) and torch.equal(rows_c, rows_e)
    for a, b in zip(compiled_args, eager_args, strict=True):
        assert torch.equal(a, b)  # staleness and both caches updated alike


class _Log(TorchDispatchMode):
    """Records the ops dispatched under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _direct_cases():
    out, anchor, labels = _stats_args(B=2, N=24, C=8, nc=3, seed=5)
    g = _gen(6)
    idx = torch.sort(torch.randperm(24, generator=g)[:7]).values.expand(2, 7).contiguous()
    bases = [torch.randn(2, 3, 24, 8, generator=g) for _ in range(4)]  # k, v bases and slopes
    pos = torch.full((2, 24), -1, dtype=torch.int64)
    pos.scatter_(1, idx, torch.arange(7).expand(2, 7).contiguous())
    rows = [torch.randn(2, 3, 7, 8, generator=g) for _ in range(2)]
    weight, inv_dt = torch.rand(2, 24, generator=g), torch.rand(2, 24, generator=g) + 0.5

    def forecast(bk, bv, sk, sv):
        k_out, v_out = torch.empty_like(bk), torch.empty_like(bv)
        ops.forecast_kv_(bk, bv, sk, sv, k_out, v_out, pos, *rows, weight, inv_dt)
        return bk, bv, sk, sv, k_out, v_out

    return {
        "token_stats": (lambda: ops.token_stats(out, anchor, labels, 3), ()),
        "gather_tokens": (lambda: (ops.gather_tokens(out, idx),), ()),
        "forecast_kv_": (forecast, bases),
    }


@pytest.mark.parametrize("name", ["token_stats", "gather_tokens", "forecast_kv_"])
def test_eager_calls_skip_the_custom_op_with_the_same_results(name):
    """Plain eager calls without autograd (a pipeline runs under no_grad) run the implementation
    without the custom op's dispatch (its cost is per call); with grad enabled, and under a
    dispatch mode (what make_fx, fake tensors and FlopCounterMode use), the custom op runs and is
    what the mode sees. Both give the same values, bit for bit."""
    fn, inputs = _direct_cases()[name]
    eager_inputs, mode_inputs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad():
        eager = fn(*eager_inputs)
    assert f"cat_ops::{name}" not in {e.name for e in prof.events()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*[t.clone() for t in inputs])  # grad enabled: the custom op keeps autograd out of the in-place writes
    assert f"cat_ops::{name}" in {e.name for e in prof.events()}
    with _Log() as log:
        traced = fn(*mode_inputs)
    assert any(op.startswith(f"cat_ops.{name}") for op in log.ops), log.ops
    for a, b in zip(eager, traced, strict=True):
        assert torch.equal(a, b)


def test_structural_checks_run_once_per_signature_and_value_checks_every_call(monkeypatch):
    """An eager call whose tensors (shape, strides, dtype, device, address) and numbers repeat a
    call that passed skips the structural checks (a pruned step repeats its calls every step);
    value checks run on every call, a failed call is not remembered, and a new address (an
    aliased out) is checked afresh."""
    fn, inputs = _direct_cases()["forecast_kv_"]
    calls = []
    real = ops._check_forecast
    monkeypatch.setattr(ops, "_check_forecast", lambda *a: (calls.append(a[0][0]), real(*a)))
    monkeypatch.setattr(ops, "_CHECKED", set())
    bk, bv, sk, sv = (t.clone() for t in inputs)
    g = _gen(7)
    pos = torch.full((2, 24), -1, dtype=torch.int64)
    pos[:, :7] = torch.arange(7)
    k, v = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    w, inv_dt = torch.rand(2, 24, generator=g), torch.rand(2, 24, generator=g)
    k_out, v_out = torch.empty_like(bk), torch.empty_like(bv)
    for _ in range(3):
        ops.forecast_kv_(bk, bv, sk, sv, k_out, v_out, pos, k, v, w, inv_dt)
    assert calls == ["k_base", "v_base"]  # checked on the first call only
    bad = pos.clone()
    bad[0, 0] = 7  # row 7 of 7 new rows: out of range
    with pytest.raises(ValueError, match="pos must lie"):
        ops.forecast_kv_(bk, bv, sk, sv, k_out, v_out, bad, k, v, w, inv_dt)
    for _ in range(2):  # an aliased out: not remembered, refused each time
        with pytest.raises(ValueError, match="distinct"):
            ops.forecast_kv_(bk, bv, sk, sv, bk, v_out, pos, k, v, w, inv_dt)
    args = _select_args()  # numbers are part of the signature: k=3 passes, then k=11 > N=10 on the same tensors
    ops.select_tokens(*args, 3, first=True)
    with pytest.raises(ValueError, match="k must lie"):
        ops.select_tokens(*args, 11, first=True)
