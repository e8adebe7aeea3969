"""An incremental night and a full rebuild projected to 100M, from benchmark runs at several sizes.

    python benchmarks/incremental_projection.py VARIANT [VARIANT ...] [--to 100000000] [--write NAME]

Reads the runs ``variants/<VARIANT>`` of ``benchmarks/results/incremental.json`` (made by
``benchmarks/incremental.py --label``, one per size, on one machine, one after another), and
projects each night of the largest run, and its rebuild, to ``--to`` vectors:

- **The search's arithmetic** (the search tasks' seconds less their group reads, and less
  the exact recall sample's riders): x (N'/N)^1.5. A query probes a fixed number of cells
  of a number of cells that grows as sqrt(N), so each query costs sqrt(N) more, and a
  night has N times the queries. The rebuild's is scaled by the nights' ``nprobe`` over
  its own, where its calibration chose another.
- **The search's group reads**: x N'/N (each group read twice, whatever the size);
  the rebuild's from x N'/N to x 4.7 N'/N (its chunked sweep, measured in session 26).
- **The exact sample's riders** (1,000 queries against every vector): x N'/N.
- **Everything else** (the wall time less the search's: JVM and session start, planning,
  the index diff, assignment and store, the list statistics, thresholds, merge, recall
  rows, the commit): fitted as ``a + b N`` over the sizes by least squares, for each night
  apart, and taken at N'. ``a`` is what does not grow with the collection at these sizes
  (start-up, Spark jobs' and stages' fixed costs); ``b`` the rest.

Task seconds become wall seconds on the benchmark's 2 slots. Every figure is a projection
from the runs' measured parts, not a measurement at N'.

``--in-process``: runs whose night and rebuild ran in the driver process (1,280-d at
500k, ``run.driver_max_mb``), which have no search tasks to split. Each side's **stage
seconds** (index build and neighbours walls; the JVM and the commit left out) are its
search's wall x (N'/N)^1.5 from the largest run, plus the rest fitted as ``a + b N`` over
the sizes; also with the night's search at the rebuild's ``nprobe`` (x its own over the
night's: a night keeps its base's), and with the searches scaled from the smallest run.
(Session 41 computed ``projections.s41_1280_in_process`` by this rule by hand.)

``--cluster 64,200``: also the ratio on that many slots, for each night. Every projected
part above is divided by the slots (ideally: no skew, no group reads beyond the ones
counted), and the parts that do not divide are added whole: Spark's fixed cost of a stage
run (``--spark-fixed``, 29 s: session 34's fit of the night's fixed part at 1M in groups)
on both sides, and on the night's the driver-side id sets measured at ``--to`` images
(``driver_sets.json``, ``benchmarks/driver_sets.py``; ``--driver-path``: before session
45's bucketed merge, collections, set operations, two broadcast joins' build sides of ~17M
ids and the ``_changes`` frame, 55 s at 100M; since, the night's own small sets and two
broadcasts of them). Those are in the
2-slot figures already, inside the fitted rest; dividing them too and adding them whole
counts them twice, so the cluster figures lean high. A projection, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "incremental.json"
DRIVER_SETS = RESULTS.parent / "driver_sets.json"
SLOTS = 2  # the benchmark's local[2]
REBUILD_READS = (1.0, 4.7)  # the rebuild's group reads: x N'/N up to its chunked sweep's 4.7x


def night_parts(row: dict) -> dict:
    """One benchmark night's measured parts (seconds): walls, searches' walls, and the
    search tasks' seconds split into arithmetic, reads and the exact sample's riders."""
    t = row["incremental_manifest"]["timings"]
    st = t["search_tasks"]
    fn = row["full_neighbors"]
    ft = fn["timings"]
    exact = float(st.get("exact_s") or 0.0)
    return {
        "n_inc_wall": float(row["incremental_s"]),
        "n_search": float(t["search_s"]),
        "n_arith": float(st["home_s"] + st["visit_s"] + st.get("merge_s", 0.0) - st["read_s"] - exact),
        "n_reads": float(st["read_s"]),
        "n_exact": exact,
        "f_wall": float(row["full_s"]),
        "f_search": float(ft["search_s"]),
        "f_arith": float(ft["search_tasks"]["task_s"] - ft["search_tasks"]["read_s"]),
        "f_reads": float(ft["search_tasks"]["read_s"]),
        "f_nprobe": fn.get("nprobe"),
        "n_nprobe": row["incremental_manifest"].get("nprobe"),
    }


def project(runs: dict[int, list[dict]], to: int) -> list[dict]:
    sizes = sorted(runs)
    big = sizes[-1]
    out = []
    for i in range(min(len(runs[n]) for n in sizes)):
        parts = {n: night_parts(runs[n][i]) for n in sizes}
        x = np.array(sizes, float)
        fit = {}
        for side, wall, search in (("night", "n_inc_wall", "n_search"), ("rebuild", "f_wall", "f_search")):
            y = np.array([parts[n][wall] - parts[n][search] for n in sizes])
            b, a = np.polyfit(x, y, 1) if len(sizes) > 1 else (y[0] / x[0], 0.0)
            fit[side] = {
                "fixed_s": round(float(a), 1),
                "per_million_s": round(float(b) * 1e6, 1),
                "measured": dict(zip(sizes, y.round(1).tolist(), strict=True)),
            }
        p = parts[big]
        grow = to / big
        nprobe = p["n_nprobe"] or p["f_nprobe"]
        scale = (nprobe / p["f_nprobe"]) if nprobe and p["f_nprobe"] else 1.0
        rest_n = fit["night"]["fixed_s"] + fit["night"]["per_million_s"] * to / 1e6
        night = {
            "rest": rest_n,
            "arithmetic": p["n_arith"] / SLOTS * grow**1.5,
            "reads": p["n_reads"] / SLOTS * grow,
            "exact_sample": p["n_exact"] / SLOTS * grow,
        }
        rest_f = fit["rebuild"]["fixed_s"] + fit["rebuild"]["per_million_s"] * to / 1e6
        reb_core = rest_f + p["f_arith"] / SLOTS * grow**1.5 * scale
        rebuild = [reb_core + p["f_reads"] / SLOTS * grow * r for r in REBUILD_READS]
        total = sum(night.values())
        out.append(
            {
                "night": runs[big][i]["night"],
                "fit_wall_less_search": fit,
                "night_s": {k: round(v) for k, v in {**night, "total": total}.items()},
                "rebuild_s": [round(v) for v in rebuild],
                "rebuild_nprobe_scaled": [p["f_nprobe"], nprobe],
                "ratio": [round(total / rebuild[1], 4), round(total / rebuild[0], 4)],
            }
        )
    return out


def project_in_process(runs: dict[int, list[dict]], to: int) -> list[dict]:
    """The ``--in-process`` rule (the docstring): stage seconds, each side's search x (N'/N)^1.5."""
    sizes = sorted(runs)
    small, big = sizes[0], sizes[-1]
    out = []
    for i in range(min(len(runs[n]) for n in sizes)):
        m = {}
        for n in sizes:
            r = runs[n][i]
            m[n] = {
                "n_stages": float(r["incremental_stages_s"]),
                "n_search": float(r["incremental_manifest"]["timings"]["search_s"]),
                "f_stages": float(r["full_stages_s"]),
                "f_search": float(r["full_neighbors"]["timings"]["search_s"]),
                "n_nprobe": r["incremental_manifest"].get("nprobe"),
                "f_nprobe": r["full_neighbors"].get("nprobe"),
            }
        x = np.array(sizes, float)
        fit = {}
        for side in ("n", "f"):
            y = np.array([m[n][f"{side}_stages"] - m[n][f"{side}_search"] for n in sizes])
            b, a = np.polyfit(x, y, 1) if len(sizes) > 1 else (y[0] / x[0], 0.0)
            fit[side] = (float(a), float(b), y)
        rest = {side: fit[side][0] + fit[side][1] * to for side in fit}
        p = m[big]
        night_search = p["n_search"] * (to / big) ** 1.5
        rebuild_search = p["f_search"] * (to / big) ** 1.5
        at_f = night_search * (p["f_nprobe"] / p["n_nprobe"]) if p["n_nprobe"] and p["f_nprobe"] else night_search
        q = m[small]
        from_small = (q["n_search"] * (to / small) ** 1.5 + rest["n"]) / (q["f_search"] * (to / small) ** 1.5 + rest["f"])
        out.append(
            {
                "night": runs[big][i]["night"],
                "measured": {str(n): {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m[n].items()} for n in sizes},
                "search_share_measured": {str(n): round(m[n]["n_search"] / m[n]["f_search"], 4) for n in sizes},
                "rest_fit": {
                    side: {
                        "fixed_s": round(fit[key][0], 1),
                        "per_million_s": round(fit[key][1] * 1e6, 1),
                        "measured": dict(zip(map(str, sizes), fit[key][2].round(1).tolist(), strict=True)),
                    }
                    for side, key in (("night", "n"), ("rebuild", "f"))
                },
                "night_s": {"search": round(night_search), "search_at_rebuild_nprobe": round(at_f), "rest": round(rest["n"])},
                "rebuild_s": {"search": round(rebuild_search), "rest": round(rest["f"])},
                "ratio": round((night_search + rest["n"]) / (rebuild_search + rest["f"]), 4),
                "ratio_at_rebuild_nprobe": round((at_f + rest["n"]) / (rebuild_search + rest["f"]), 4),
                f"ratio_from_{small // 1000}k_search": round(from_small, 4),
            }
        )
    return out


def driver_sets_s(n: int, path: str) -> float:
    """The slowest measured run of the night's driver-side id sets at ``n`` images, for
    the night's merge ``path`` (``driver_sets.py --path``; runs before it: ``broadcast``)."""
    runs = [r for r in json.loads(DRIVER_SETS.read_text())["runs"].values() if int(r["n"]) == n and r.get("path", "broadcast") == path]
    if not runs:
        sys.exit(f"--cluster: {DRIVER_SETS.name} has no run at {n:,} images (benchmarks/driver_sets.py --n {n} --path {path})")
    return max(float(r["total_s"]) for r in runs)


def on_cluster(night_s: float, rebuild_s: float, slots: list[int], serial_night: float, fixed: float) -> dict:
    """The ratio on each number of slots: the 2-slot projections divided by the slots, the
    serial parts added whole (the module docstring)."""
    out = {}
    for s in slots:
        night = night_s * SLOTS / s + fixed + serial_night
        rebuild = rebuild_s * SLOTS / s + fixed
        out[str(s)] = {"night_s": round(night, 1), "rebuild_s": round(rebuild, 1), "ratio": round(night / rebuild, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--to", type=int, default=100_000_000)
    ap.add_argument("--write", help="record the projection under projections/<NAME> of the results file")
    ap.add_argument("--in-process", action="store_true", help="runs in the driver process: stage seconds (the docstring)")
    ap.add_argument("--cluster", help="comma-separated slot counts: the ratio on that many slots (the docstring)")
    ap.add_argument("--spark-fixed", type=float, default=29.0, help="--cluster: Spark's fixed seconds a stage run, each side")
    ap.add_argument(
        "--driver-path",
        choices=("bucketed", "broadcast"),
        default="bucketed",
        help="--cluster: whose driver-side id sets are added whole (driver_sets.py --path; broadcast: before session 45)",
    )
    args = ap.parse_args()
    slots = [int(v) for v in args.cluster.split(",")] if args.cluster else []
    serial = driver_sets_s(args.to, args.driver_path) if slots else 0.0
    results = json.loads(RESULTS.read_text())
    runs: dict[int, list[dict]] = {}
    for v in args.variants:
        rec = results["variants"][v]
        n = int(rec["n_base"])
        if n in runs:
            sys.exit(f"two runs at {n}: {v}")
        missing = [r["night"] for r in rec["nights"] if "full_neighbors" not in r]
        if missing:
            sys.exit(f"{v}: nights {missing} have no full_neighbors (the rebuild's search timings)")
        runs[n] = rec["nights"]
    if args.in_process:
        got = project_in_process(runs, args.to)
        for g in got:
            print(json.dumps({k: g[k] for k in ("night", "search_share_measured", "night_s", "rebuild_s", "ratio")}))
            print(f"  ratio {g['ratio']}, at the rebuild's nprobe {g['ratio_at_rebuild_nprobe']}")
            if slots:
                night, rebuild = g["night_s"]["search"] + g["night_s"]["rest"], g["rebuild_s"]["search"] + g["rebuild_s"]["rest"]
                g["on_cluster"] = on_cluster(night, rebuild, slots, serial, args.spark_fixed)
                print("  on a cluster: " + ", ".join(f"{s} slots {100 * v['ratio']:.1f} %" for s, v in g["on_cluster"].items()))
    else:
        got = project(runs, args.to)
        for g in got:
            f, lo, hi = g["fit_wall_less_search"], g["rebuild_s"][0], g["rebuild_s"][1]
            for side in ("night", "rebuild"):
                print(
                    f"night {g['night']}, the {side} less its search: {f[side]['measured']}"
                    f" -> {f[side]['fixed_s']} s + {f[side]['per_million_s']} s/M"
                )
            print(f"  at {args.to:,}: night {g['night_s']}, rebuild {lo:,}-{hi:,} s: {100 * g['ratio'][0]:.1f}-{100 * g['ratio'][1]:.1f} %")
            if slots:  # against the rebuild's cheaper read figure: the higher ratio
                g["on_cluster"] = on_cluster(g["night_s"]["total"], lo, slots, serial, args.spark_fixed)
                print("  on a cluster: " + ", ".join(f"{s} slots {100 * v['ratio']:.1f} %" for s, v in g["on_cluster"].items()))
    if args.write:
        results.setdefault("projections", {})[args.write] = {
            "variants": args.variants,
            "to": args.to,
            "rule": "benchmarks/incremental_projection.py"
            + (" --in-process" if args.in_process else "")
            + (f" --cluster {args.cluster} --spark-fixed {args.spark_fixed:g} --driver-path {args.driver_path}" if slots else "")
            + " (its docstring)",
            "nights": got,
            "note": "projected, not measured",
        }
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
