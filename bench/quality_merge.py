"""Merges quality-suite runs that split one comparison across processes (for example one per CPU
core, each with some of the --methods) into one JSON, Markdown table and plot.

    python bench/quality_merge.py a.json b.json --json merged.json

The runs must measure the same thing: the same model, images (prompts x seeds, the same items in
the same order), steps, guidance, held-out tuning prompts, reference CAT setting and code (git
sha); each must have found its dense images reproducible. The dense record is kept once (from the
first run); every other method must appear in one run only. Each record keeps what its own run
measured, its CPU speedup included (paired with that run's dense timings). The example grid is
the first run's (its path is linked, not redrawn): the merge has no images.

Runs of one comparison made at different commits can be put in one table when the code that the
kept methods run did not change between them (check it by reproducing some of their images at the
newest commit): ``--across-commits`` lifts the same-sha rule and the same-threads rule (the
thread count moves the CPU timings, which each record pairs with its own run's dense ones, not
the images), each record keeps its own ``git_sha`` and ``threads`` and the table's notes list
them; ``RUN.json=METHOD,METHOD`` keeps only those methods
(provider ids) of a run, so that a method measured again later is taken from one run only::

    python bench/quality_merge.py --across-commits old.json=catf@mac:0.35,cat:0.3:8 new.json --json all.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import quality_models  # noqa: E402
import quality_report  # noqa: E402

# fields every run must share for its records to sit in one table
SAME = ("model", "shape", "reference_cat", "target_mac_fraction", "git_sha", "device", "threads", "dense_flops")


def merge(docs: list[dict], across_commits: bool = False, keep: list[set[str] | None] | None = None) -> list[dict]:
    """The records of every run, dense once; ValueError where the runs do not measure the same thing.
    across_commits: runs may differ in git sha; keep: per run, the providers to take (None: all)."""
    first = docs[0]["records"][0]
    same = [f for f in SAME if not (across_commits and f in ("git_sha", "threads"))]
    keep = keep or [None] * len(docs)
    records, seen, items = [], set(), None
    for n, doc in enumerate(docs):
        if not any(r["provider"] == "dense" for r in doc["records"]):
            raise ValueError(f"run {n + 1} has no dense record")
        missing = (keep[n] or set()) - {r["provider"] for r in doc["records"]}
        if missing:
            raise ValueError(f"run {n + 1} has no method {sorted(missing)}")
        for r in doc["records"]:
            if keep[n] is not None and r["provider"] not in keep[n] | {"dense"}:
                continue
            for field in same:
                if r.get(field) != first.get(field):
                    raise ValueError(f"run {n + 1} differs from run 1 in {field}: "
                                     f"{r.get(field)!r} != {first.get(field)!r}")  # fmt: skip
            if not r.get("dense_reproducible", True):
                raise ValueError(f"run {n + 1} did not reproduce its dense images")
            scored = [(i["prompt"], i["seed"]) for i in r.get("per_item") or []]
            if scored and items is None:
                items = scored
            elif scored and scored != items:
                raise ValueError(f"{r['provider']} (run {n + 1}) scored other images than the runs before it")
            if r["provider"] == "dense" and n > 0:
                continue
            if r["provider"] in seen:
                raise ValueError(f"{r['provider']} ran in more than one run")
            seen.add(r["provider"])
            records.append(r)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/quality_merge.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="the quality-suite JSON files (RUN.json=METHOD,... keeps those methods "
                                           "only), the first one's examples kept")  # fmt: skip
    p.add_argument("--json", type=Path, required=True, help="the merged JSON; .md and .png go next to it")
    p.add_argument("--across-commits", action="store_true",
                   help="runs may come from different commits and thread counts (each record keeps its git sha "
                        "and threads)")
    args = p.parse_args(argv)
    split = [run.split(".json=", 1) for run in args.runs]
    args.runs = [Path(parts[0] + ".json" if len(parts) == 2 else parts[0]) for parts in split]
    keep = [set(parts[1].split(",")) if len(parts) == 2 else None for parts in split]
    docs = [json.loads(path.read_text()) for path in args.runs]
    try:
        records = merge(docs, args.across_commits, keep)
    except ValueError as exc:
        print(f"bench/quality_merge.py: {exc}", file=sys.stderr)
        return 2
    env = records[0]
    model = quality_models.get(env["model"])
    shape = env["shape"]
    _, md_path, plot_path, _ = quality_report.output_paths(args.json, model, env["device"])
    _, _, _, examples = quality_report.output_paths(args.runs[0], model, env["device"])
    quick = any("--quick" in doc.get("argv", []) for doc in docs)
    opts = SimpleNamespace(mac_items=env["mac_items"], tune_items=shape.get("tune_items", 0), quick=quick)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plot_note = quality_report.write_plot(records, plot_path, shape, model)
    md = quality_report.markdown(records, shape, opts, plot_note, examples, plot_path, model)
    merged_from = ", ".join(f"`{path}`" + (f" (git {doc['records'][0].get('git_sha')}, "
                                            f"{doc['records'][0].get('threads')} thread(s)"
                                            + (f"; {', '.join(sorted(k))}" if k else "") + ")")
                            for path, doc, k in zip(args.runs, docs, keep, strict=True))  # fmt: skip
    md_path.write_text(md + f"\nMerged from {merged_from} (`python bench/quality_merge.py"
                       + (" --across-commits" if args.across_commits else "") + "`).\n")
    doc = dict(docs[0], argv=sys.argv[1:] if argv is None else argv, merged_from=[str(x) for x in args.runs],
               records=records)  # fmt: skip
    args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"{len(records)} records -> {args.json}, {md_path}" + ("" if plot_note else f", {plot_path}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
