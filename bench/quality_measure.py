"""Quality suite, measurement: one generation, its MAC count, and the two measuring passes of a run
(MAC fractions with peer tuning, then quality and wall clock, dense and methods interleaved), and
the per-method record built from them."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from quality_base import Method, cat_config_fields, no_session
from quality_models import first_image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


class Memo(dict):
    """Context.memo that also keeps its tuning PSNRs in a JSON-lines file (``--memo PATH``), so a
    long run stopped midway resumes where it was: a restarted run scores no setting on an item the
    file already holds. The first line records what the PSNRs depend on (commit, model, steps,
    guidance, device); a file from another run is refused, never reused. Only the tuning PSNRs
    persist (the bulk of a run); what else is memoized is measured again, a few generations."""

    PERSISTED = "tune_psnr"

    def __init__(self, path: str | Path, header: dict):
        super().__init__()
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size:
            text = self.path.read_text()
            if not text.endswith("\n"):  # a stopped run's last line, cut short: start the next one afresh
                with self.path.open("a") as f:
                    f.write("\n")
            lines = text.splitlines()
            if json.loads(lines[0]) != header:
                raise SystemExit(f"bench quality: --memo {self.path} was written by another run "
                                 f"({lines[0]}; this one: {json.dumps(header)}); pass another path")
            for line in lines[1:]:
                try:
                    key, value = json.loads(line)
                except ValueError:  # a line cut short when the run was stopped
                    continue
                super().__setitem__(_tuples(key), value)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(header) + "\n")
        self.resumed = len(self)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if key and key[0] == self.PERSISTED:
            with self.path.open("a") as f:
                f.write(json.dumps([list(key), value]) + "\n")


def _tuples(x):
    """A key read back from JSON: its lists as the tuples they were."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


@dataclasses.dataclass
class Context:
    pipe: Any
    items: list[tuple[str, int]]
    steps: int
    guidance: float
    tune_set: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # held-out tuning items
    dense_flops: int = 0
    target: float = 0.0
    bar: Any = None
    arch: str = "SD3"  # the model's architecture, as the notes name it
    tune_dense: dict = dataclasses.field(default_factory=dict)  # tuning item -> its dense image
    memo: dict = dataclasses.field(default_factory=dict)  # what tuning measured once for several methods


def generate(
    ctx: Context, item: tuple[str, int], reset: Callable[[], None] | None = None
) -> tuple[torch.Tensor, float]:
    """One pipeline call: (image (3, H, W) in [0, 1] on the CPU, seconds)."""
    prompt, seed = item
    if reset is not None:
        reset()
    t0 = time.perf_counter()
    out = ctx.pipe(prompt, num_inference_steps=ctx.steps, guidance_scale=ctx.guidance,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")  # fmt: skip
    return first_image(out), time.perf_counter() - t0


def count_flops(ctx: Context, item: tuple[str, int], reset: Callable[[], None] | None = None) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        generate(ctx, item, reset)
    if ctx.bar is not None:
        ctx.bar.update()
    return counter.get_total_flops()


def mac_fraction(ctx: Context, method: Method, items: list[tuple[str, int]]) -> list[float]:
    with method.session(ctx.pipe) as reset:
        return [count_flops(ctx, it, reset) / ctx.dense_flops for it in items]



def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:400] + where



def measure_macs(ctx: Context, methods: list[Method], mac_items: list[tuple[str, int]], ref: str,
                 cat_method: Callable[[str], Method], prepare_peer: Callable[[Context, Method], None],
                 ) -> tuple[dict[str, list[float]], dict[str, float]]:  # fmt: skip
    """MAC fractions of every method (FlopCounterMode; not timed): dense and CAT on one generation,
    each peer tuned to its CAT setting's fraction first, then counted on mac_items when its compute
    depends on the data. Leaves ctx.target at the reference CAT setting's fraction. Returns the
    fractions by method id and, for CAT methods, cat_pruning.stats' own fraction."""
    import cat_pruning

    pipe, items = ctx.pipe, ctx.items
    ctx.dense_flops = count_flops(ctx, items[0])
    macs: dict[str, list[float]] = {"dense": [1.0]}
    stats_frac: dict[str, float] = {}
    for m in methods:
        if m.tune is not None:
            continue
        with m.session(pipe) as reset:
            macs[m.id] = [count_flops(ctx, items[0], reset) / ctx.dense_flops]
            stats_frac[m.id] = cat_pruning.stats(pipe).mac_fraction

    def cat_fraction(spec: str) -> float:  # counted here when that CAT setting is not among the methods
        if spec.startswith("mac:"):  # a budget given as a fraction
            return float(spec[4:])
        if spec not in macs:
            with cat_method(spec).session(pipe) as reset:
                macs[spec] = [count_flops(ctx, items[0], reset) / ctx.dense_flops]
        return macs[spec][0]

    for m in methods:
        if m.tune is None:
            continue
        ctx.target = cat_fraction(m.matched_to or ref)
        prepare_peer(ctx, m)
        if m.error is None:
            macs[m.id] = mac_fraction(ctx, m, mac_items if m.data_dependent else mac_items[:1])
            if m.group == "catf":
                with m.session(pipe) as reset:
                    generate(ctx, items[0], reset)
                    stats_frac[m.id] = cat_pruning.stats(pipe).mac_fraction
    ctx.target = cat_fraction(ref)
    return macs, stats_frac


@dataclasses.dataclass
class QualityRun:
    """What measure_quality saw: per unique method id, the times and (PSNR, SSIM) per item."""

    order: list[str]  # "dense", then one id per distinct configuration
    alias: dict[str, str]  # method id -> the id whose runs it reuses (same configuration)
    by_id: dict[str, Method]
    times: dict[str, list[float]]
    scores: dict[str, list[tuple[float, float]]]
    examples: dict[str, dict[int, torch.Tensor]]
    failed: dict[str, str]
    first_dense: torch.Tensor
    dense_reproducible: bool


def measure_quality(ctx: Context, methods: list[Method], ref: str, no_bar: bool) -> QualityRun:
    """Quality and wall clock: per prompt+seed, dense and every runnable method, rotating order.
    Methods with the same CAT configuration run once. The dense image of the first item is made
    again at the end to check that nothing leaked into the unpatched pipeline."""
    from tqdm.auto import tqdm

    import cat_pruning
    from cat_pruning.metrics import psnr, ssim

    pipe, items = ctx.pipe, ctx.items
    runnable = [m for m in methods if m.error is None]
    unique: dict[str, Method] = {}
    alias: dict[str, str] = {}
    for m in runnable:
        key = repr(cat_pruning.CATConfig().replace(**cat_config_fields(m.params))) if m.group != "peer" else m.id
        if key in unique:
            alias[m.id] = unique[key].id
        else:
            unique[key] = m
    order = ["dense", *(m.id for m in unique.values())]
    by_id = {m.id: m for m in runnable}
    times: dict[str, list[float]] = {k: [] for k in order}
    scores: dict[str, list[tuple[float, float]]] = {k: [] for k in order[1:]}
    examples: dict[str, dict[int, torch.Tensor]] = {}
    bar = tqdm(total=len(items) * len(order), desc="quality: generations", unit="gen", file=sys.stderr,
               disable=no_bar)  # fmt: skip
    first_dense = None
    failed: dict[str, str] = {}
    for i, item in enumerate(items):
        rot = i % len(order)
        images: dict[str, torch.Tensor] = {}
        for mid in order[rot:] + order[:rot]:
            if mid in failed:
                continue
            session = no_session if mid == "dense" else by_id[mid].session
            try:
                with session(pipe) as reset:
                    images[mid], seconds = generate(ctx, item, reset)
            except Exception as exc:  # noqa: BLE001 - a peer failing on one prompt: record it, go on
                if mid == "dense":
                    raise
                failed[mid] = f"on {item[0]!r} seed {item[1]}: {_error_text(exc)}"
                continue
            finally:
                bar.update()
            times[mid].append(seconds)
        dense = images["dense"]
        if first_dense is None:
            first_dense = dense
        for mid in order[1:]:
            if mid not in failed:
                scores[mid].append((psnr(images[mid], dense), ssim(images[mid], dense)))
        for mid, im in images.items():  # candidates for the example grid: dense, the reference CAT, peers
            if mid in ("dense", ref) or (mid in by_id and by_id[mid].group == "peer"):
                examples.setdefault(mid, {})[i] = im
    bar.close()
    dense_again, _ = generate(ctx, items[0])
    return QualityRun(order, alias, by_id, times, scores, examples, failed, first_dense,
                      bool(torch.equal(dense_again, first_dense)))  # fmt: skip


def build_records(methods: list[Method], q: QualityRun, macs: dict[str, list[float]], stats_frac: dict[str, float],
                  items: list[tuple[str, int]], common_fields: dict[str, Any], ref: str) -> list[dict]:  # fmt: skip
    """One record per method (dense first): its MAC fractions, times, and scores or its error."""
    times, scores, alias, failed = q.times, q.scores, q.alias, q.failed
    records = [_record("dense", "dense (reference)", "dense", {}, times["dense"], times["dense"], None, [1.0],
                       items, common_fields, [])]  # fmt: skip
    for m in methods:
        if alias.get(m.id, m.id) in failed:
            m.error = failed[alias.get(m.id, m.id)]
        matched = dict(matched_to=m.matched_to or ref) if m.group in ("peer", "catf") else {}
        if m.error is not None:
            records.append(dict(case=f"quality[{m.id}]", provider=m.id, name=m.name, group=m.group, params=m.params,
                                status="error", error=m.error, notes=m.notes, **matched, **common_fields))  # fmt: skip
            continue
        src = alias.get(m.id, m.id)
        notes = list(m.notes) + ([f"same configuration as {src}: its runs are reused"] if src != m.id else [])
        rec = _record(m.id, m.name, m.group, m.params, times[src], times["dense"], scores[src], macs[m.id], items,
                      common_fields, notes)  # fmt: skip
        if m.id in stats_frac:
            rec["stats_mac_fraction"] = stats_frac[m.id]
        records.append({**rec, **matched})
    return records


def _record(mid, name, group, params, t, t_dense, scores, fracs, items, common_fields, notes) -> dict:
    ts = sorted(t)
    ratios = [d / x for d, x in zip(t_dense, t, strict=True)]
    rec = dict(case=f"quality[{mid}]", provider=mid, name=name, group=group, status="ok",
               params={k: v for k, v in params.items()}, notes=notes,
               mac_fraction=statistics.fmean(fracs), mac_fraction_min=min(fracs), mac_fraction_max=max(fracs),
               mac_items=len(fracs),
               median_ms=1e3 * statistics.median(ts), p20_ms=1e3 * ts[len(ts) // 5],
               p80_ms=1e3 * ts[(4 * len(ts)) // 5],
               repeats=len(ts), speedup=statistics.median(ratios),
               speedup_of_medians=statistics.median(t_dense) / statistics.median(t), **common_fields)  # fmt: skip
    if scores is not None:
        p = [s[0] for s in scores]
        s = [s[1] for s in scores]
        rec.update(psnr_mean=statistics.fmean(p), psnr_worst=min(p), psnr_median=statistics.median(p),
                   ssim_mean=statistics.fmean(s), ssim_worst=min(s),
                   per_item=[dict(prompt=it[0], seed=it[1], psnr=a, ssim=b, ms=1e3 * x)
                             for it, a, b, x in zip(items, p, s, t, strict=True)])  # fmt: skip
    return rec
