"""build_index at the shipped defaults on 1,280-d vectors under Spark's default 1 GB driver.

    python benchmarks/build_index_memory.py [--n 1000000] [--dim 1280] [--driver-memory 1g]

The vectors come from the all-pairs benchmark's mixture generator (fitted to the real Lite0
embeddings of clothing-small, here without reducing the dimension). The embeddings table is
written beforehand (untimed); then ``jobs/build_index.py`` runs as a user runs it, with every
index setting at its default and ``spark.driver.memory`` pinned to Spark's own default
(local mode would otherwise size it from the machine). Peak RSS is the process tree's.
Results are merged into benchmarks/results/build_index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "build_index.json"


def main() -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from all_pairs import mixture, watch_peak_rss

    from cbir_lib.vectors.arrow import vectors_array

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--driver-memory", default="1g")
    args = ap.parse_args()
    x = mixture(args.n, args.dim)
    ids = np.arange(args.n, dtype=np.int64) * 2654435761 % (2**62) - 2**61
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        root = Path(tmp)
        emb = root / "embeddings" / "run=bench"
        emb.mkdir(parents=True)
        step = 50_000
        for s in range(0, args.n, step):
            m = min(step, args.n - s)
            pq.write_table(
                pa.table(
                    {
                        "image_id": pa.array(ids[s : s + m]),
                        "embedding": vectors_array(np.asarray(x[s : s + m])),
                        "dim": pa.array(np.full(m, args.dim, dtype=np.int32)),
                        "status": pa.array(["ok"] * m),
                        "error": pa.array([None] * m, pa.string()),
                    }
                ),
                emb / f"part-{s // step:05d}.parquet",
            )
        (emb / "_manifest.json").write_text(json.dumps({"run_id": "bench", "dim": args.dim}))
        (root / "embeddings" / "_LATEST").write_text("bench")
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = [
            sys.executable,
            str(ROOT / "jobs" / "build_index.py"),
            "--output",
            str(root),
            "--master",
            "local[2]",
            "--run-id",
            "bench",
            "--set",
            f"spark.conf.spark.driver.memory={args.driver_memory}",
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak, stop, _ = watch_peak_rss(proc.pid, every=0.5)
        out, err = proc.communicate()
        stop.set()
        wall = time.perf_counter() - t0
        manifest = json.loads((root / "index" / "run=bench" / "_manifest.json").read_text()) if proc.returncode == 0 else {}
    row = {
        "n": args.n,
        "dim": args.dim,
        "driver_memory": args.driver_memory,
        "defaults": True,
        "status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak[0] / 2**20),
        "n_cells": manifest.get("n_cells"),
        "trained_on": (manifest.get("centroids") or {}).get("trained_on"),
        "timings": manifest.get("timings"),
        "measured": time.strftime("%Y-%m-%d"),
    }
    if proc.returncode:
        row["error"] = err[-1500:]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    results["runs"] = [r for r in results["runs"] if (r["n"], r["dim"], r["driver_memory"]) != (args.n, args.dim, args.driver_memory)] + [
        row
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "error"}))
    if proc.returncode:
        log = Path(tempfile.gettempdir()) / "build_index_memory.stderr.log"
        log.write_text(err)
        sys.stderr.write(err[-3000:] + f"\n(the whole log: {log})\n")


if __name__ == "__main__":
    main()
