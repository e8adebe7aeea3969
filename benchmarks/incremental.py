"""Incremental nights against full rebuilds of the same collection.

    python benchmarks/incremental.py [--n 1000000] [--nights 5] [--data mixture|fashion|real]

Start: ``n`` vectors of the 256-d mixture of ``all_pairs.py`` (the same cached file), a
full ``build_index`` + ``neighbors``. ``--data fashion`` (or ``real``) starts from real
embeddings instead, made by this project's extract at its defaults (``all_pairs.py``:
Fashion-MNIST or clothing-small), and draws the nights' fresh and changed vectors from the
rest of them. Then ``--nights`` nights, each:

- adds 1 % new vectors: 70 % fresh draws of the same mixture (rows past ``n`` of the
  cached 4M file), 30 % near-copies of old ones (the old vector plus noise of norm 0.05,
  renormalised: the reverse updates must put them in their originals' lists);
- deletes 0.2 % and changes 0.2 % (a changed image gets a fresh vector and a new
  content hash) of the old ones, drawn at random.

The night's embeddings table is written (untimed) and read by two output roots: one runs
``jobs/pipeline.py --stages build_index,neighbors`` with ``index.mode=incremental
neighbors.mode=incremental`` on last night's tables, the other the same with the full
modes on its own copy. Both as a user runs them (one spark-submit, JVM start included,
``local[2]``, the settings of ``all_pairs.py``: method auto at recall 0.95, no re-ranking,
no forests, and ``run.driver_max_mb=3072`` so that both run in the driver process). The
root of the full rebuilds starts each night from nothing but the embeddings, so it is a
real rebuild.

After each night, both tables are read back and checked against exact search (numpy,
blocked) over the current collection, on 500 new and 500 old images: recall@10, with
ties at the 10th score counted as found. Also: how many old lists changed (the
incremental run's count), how many rows of each table still name a deleted image, and of
the (old image, new image) pairs that exact search puts in an old sampled list, the share
the incremental list holds (``reverse_recall``). Each night's ``io`` holds both runs' disk
reads and writes and the memory and page cache they started with (:func:`disk_and_memory`):
at 2M on a 24 GB machine a rebuild's writes evict the other side's files, and the night
reads them from disk.

Results: ``benchmarks/results/incremental.json``. Runs at several sizes (``--label``) project to
100M with ``benchmarks/incremental_projection.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results" / "incremental.json"
K = 10
SAMPLE = 500


def write_embeddings(
    root: Path, run_id: str, ids: np.ndarray, x: np.ndarray, versions: np.ndarray, fresh: np.ndarray | None = None
) -> None:
    """A committed embeddings snapshot; ``content_sha256`` stands for the image's content
    (its id and version: a changed image gets a new version). ``fresh``: the night's new
    and changed rows, which extract writes in files of their own (cbir_lib/features/run.py)."""
    from all_pairs import write_embeddings as write

    sha = [hashlib.sha256(f"{i}:{v}".encode()).hexdigest() for i, v in zip(ids, versions, strict=True)]
    write(root, ids, x, run_id, sha=sha, commit_id=f"bench-{run_id}", fresh=fresh)


def disk_and_memory() -> dict:
    """The machine's block devices' bytes read and written so far (``/proc/diskstats``,
    whole disks only) and its available memory and page cache (``/proc/meminfo``), in MB:
    a run that reads far more from disk than the data it reads did not find it in the page
    cache, and its seconds measure the disk, not the code."""
    read = written = 0
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if len(f) > 9 and Path(f"/sys/block/{f[2]}").exists():  # a disk, not a partition
                read, written = read + int(f[5]), written + int(f[9])  # 512-byte sectors
        mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()}
    except OSError:
        return {}
    return {
        "read_mb": round(read * 512 / 2**20),
        "written_mb": round(written * 512 / 2**20),
        "available_mb": round(mem.get("MemAvailable", 0) / 1024),
        "cached_mb": round(mem.get("Cached", 0) / 1024),
    }


# Each pipeline run's disk traffic and the memory it started with (run_pipeline's record).
IO: dict[str, dict] = {}


def run_pipeline(root: Path, run_id: str, mode: str, log: Path) -> float:
    args = [
        "--output",
        str(root),
        "--master",
        "local[2]",
        "--set",
        "spark.conf.spark.driver.memory=8g",
        "--run-id",
        run_id,
        "index.forests=false",
        f"index.mode={mode}",
        "neighbors.method=auto",
        "neighbors.min_recall=0.95",
        "neighbors.rerank=none",
        f"neighbors.mode={mode}",
        # Both runs in the driver process at 1M: a night's store and lists (~2.1 GB) pass
        # the default 1 GB limit, and a night on the executors is another comparison.
        "run.driver_max_mb=3072",
        *os.environ.get("CBIR_BENCH_ARGS", "").split(),
    ]
    IO.pop(mode, None)  # no figure rather than last night's, where /proc cannot be read
    before = disk_and_memory()
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--stages", "build_index,neighbors", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - t0
    after = disk_and_memory()
    if before and after:
        IO[mode] = {
            "disk_read_mb": after["read_mb"] - before["read_mb"],
            "disk_written_mb": after["written_mb"] - before["written_mb"],
            "available_mb_at_start": before["available_mb"],
            "cached_mb_at_start": before["cached_mb"],
        }
    with open(log, "a") as fh:
        fh.write(f"==== {root.name} {run_id} {mode} ({took:.1f} s)\n{out.stderr}")
    if out.returncode:
        raise SystemExit(f"{mode} night {run_id} failed:\n{out.stderr[-4000:]}")
    return took


def collection(data: str, n: int, dim: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, x, pool)``: ``n`` vectors to start from and the rows the nights draw new and
    changed vectors from. ``mixture``: the cached 256-d mixture's first ``n`` rows, the pool
    its rows past ``n`` of the 4M file; at another ``dim``, the mixture fitted at that
    dimension (``all_pairs.mixture(n + pool, dim)``, a pool of a tenth of ``n``, at least
    20,000). ``fashion`` / ``real``: the real embeddings of ``all_pairs.py`` (this project's
    extract at its defaults), in a fixed random order, the first ``n`` to start from and the
    rest the pool."""
    from all_pairs import dataset, mixture, random_ids

    if data == "mixture" and dim == 256:
        ids, x = dataset("mixture", n)
        return ids, np.array(x, dtype=np.float32), np.asarray(mixture(4_000_000))[n:]
    if data == "mixture":
        rng = np.random.default_rng(n)
        ids = random_ids(rng, n)
        x = mixture(n + max(n // 10, 20_000), dim)
        return ids, np.array(x[:n], dtype=np.float32), np.asarray(x[n:])
    _, x = dataset(data, 0)
    if n >= len(x):
        raise SystemExit(f"--n {n}: {data} holds {len(x)} vectors; leave some to the nights' pool")
    rng = np.random.default_rng(n)
    x = x[rng.permutation(len(x))]
    ids = random_ids(rng, n)
    return ids, np.ascontiguousarray(x[:n]), x[n:]


@dataclass
class Night:
    """The collection after one night (``ids``, ``x``, ``versions``), what the night did, and
    where the next one draws from (``used`` rows of the pool, ids from ``next_id``)."""

    ids: np.ndarray
    x: np.ndarray
    versions: np.ndarray
    new_ids: np.ndarray
    deleted_ids: np.ndarray
    changed_ids: np.ndarray
    used: int
    next_id: int


def draw_night(rng, ids: np.ndarray, x: np.ndarray, versions: np.ndarray, pool: np.ndarray, used: int, next_id: int) -> Night:
    """One night of the issue's shape on the collection ``(ids, x, versions)``, which it
    leaves as it was: 1 % added (30 % near-copies of old vectors: plus noise of norm 0.05,
    renormalised; 70 % the pool's next rows), 0.2 % deleted and 0.2 % changed (the pool's
    next rows, a new version), drawn at random."""
    m = len(ids)
    x, versions = np.array(x, dtype=np.float32), versions.copy()
    n_add, n_del, n_chg = int(0.01 * m), int(0.002 * m), int(0.002 * m)
    pick = rng.choice(m, n_del + n_chg, replace=False)
    dele, chg = pick[:n_del], pick[n_del:]
    n_copy = int(0.3 * n_add)
    if used + n_chg + n_add - n_copy > len(pool):
        raise SystemExit(f"the pool of {len(pool)} vectors is used up: fewer nights, or a smaller --n")
    # changed: a fresh vector and a new version
    x[chg] = pool[used : used + n_chg]
    used += n_chg
    versions[chg] += 1
    src = rng.choice(np.setdiff1d(np.arange(m), pick), n_copy, replace=False)
    noise = rng.normal(size=(n_copy, x.shape[1])).astype(np.float32)
    copies = x[src] + 0.05 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    fresh = pool[used : used + n_add - n_copy]
    used += n_add - n_copy
    new_x = np.concatenate([copies, fresh]).astype(np.float32)
    new_x /= np.linalg.norm(new_x, axis=1, keepdims=True)
    new_ids = np.arange(next_id, next_id + n_add, dtype=np.int64)
    keep = np.ones(m, bool)
    keep[dele] = False
    return Night(
        ids=np.concatenate([ids[keep], new_ids]),
        x=np.concatenate([x[keep], new_x]),
        versions=np.concatenate([versions[keep], np.zeros(n_add, np.int64)]),
        new_ids=new_ids,
        deleted_ids=ids[dele],
        changed_ids=ids[chg],
        used=used,
        next_id=next_id + n_add,
    )


def exact_topk(x: np.ndarray, ids: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-10 (itself excluded) of the rows ``pos`` over all of ``x``: scores, ids."""
    q = np.ascontiguousarray(x[pos])
    best_v = np.full((len(pos), K), -np.inf, np.float32)
    best_i = np.full((len(pos), K), -1, np.int64)
    for s in range(0, len(x), 200_000):
        sc = q @ x[s : s + 200_000].T
        sc[(pos[:, None] - s) == np.arange(sc.shape[1])[None, :]] = -np.inf
        part = np.argpartition(-sc, K, axis=1)[:, :K]
        v = np.concatenate([best_v, np.take_along_axis(sc, part, 1)], 1)
        i = np.concatenate([best_i, ids[s : s + 200_000][part]], 1)
        top = np.argsort(-v, axis=1, kind="stable")[:, :K]
        best_v, best_i = np.take_along_axis(v, top, 1), np.take_along_axis(i, top, 1)
    return best_v, best_i


def read_lists(root: Path, run_id: str, qids: np.ndarray):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cbir_lib.neighbors.lists import topk_arrays

    t = pq.read_table(root / "neighbors" / f"run={run_id}", columns=["image_id", "rank", "neighbor_id", "score"])
    manifest = json.loads((root / "neighbors" / f"run={run_id}" / "_manifest.json").read_text())
    sub = t.filter(pa.array(np.isin(t.column("image_id").to_numpy(), qids)))
    return topk_arrays(sub, qids, K), t.column("neighbor_id").to_numpy(), manifest


def recall(got_ids: np.ndarray, tv: np.ndarray, ti: np.ndarray, gv: np.ndarray) -> float:
    from cbir_lib.vectors.topk import recall_at_k

    return round(float(recall_at_k(got_ids, ti, tv, gv)), 5)


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nights", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--label", help="record the run under variants/<label> (the 5 nights at 1M stay the file's top level)")
    ap.add_argument(
        "--data",
        choices=("mixture", "fashion", "real"),
        default="mixture",
        help="mixture: the 256-d mixture (the issue's); fashion / real: real embeddings at the shipped defaults (all_pairs.py)",
    )
    ap.add_argument("--dim", type=int, default=256, help="--data mixture: the mixture's dimension (1280: the shipped models')")
    ap.add_argument(
        "--mixed-files",
        action="store_true",
        help="each night's new and changed rows among the others' files (extract's layout before 2026-12-07)",
    )
    args = ap.parse_args()

    n = args.n
    ids0, x0, pool = collection(args.data, n, args.dim)
    rng = np.random.default_rng(17)
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    inc, full = work / "incremental", work / "full"
    log = work / "jobs.log"
    ids, x = ids0.copy(), np.array(x0, dtype=np.float32)
    versions = np.zeros(n, np.int64)
    next_id, used = int(ids.max()) + 1, 0
    write_embeddings(inc, "night-0", ids, x, versions)
    base_s = run_pipeline(inc, "night-0", "full", log)
    print(f"base: {n} vectors, full build {base_s:.1f} s", flush=True)
    out = {
        "data": args.data,
        "n_base": n,
        "dim": int(x.shape[1]),
        "base_full_s": round(base_s, 1),
        "machine_cores": os.cpu_count(),
        "nights": [],
    }
    for night in range(1, args.nights + 1):
        run_id = f"night-{night}"
        d = draw_night(rng, ids, x, versions, pool, used, next_id)
        ids, x, versions, used, next_id = d.ids, d.x, d.versions, d.used, d.next_id
        n_add, n_del, n_chg = d.new_ids.size, d.deleted_ids.size, d.changed_ids.size
        new_ids, deleted_ids = d.new_ids, d.deleted_ids
        # The night's new and changed rows in files of their own, as extract writes them
        # (--mixed-files: among the others, as extract wrote them until 2026-12-07).
        fresh = None if args.mixed_files else np.isin(ids, np.concatenate([d.new_ids, d.changed_ids]))
        write_embeddings(inc, run_id, ids, x, versions, fresh)
        inc_s = run_pipeline(inc, run_id, "incremental", log)
        # The full rebuild: the same embeddings, nothing else.
        if full.exists():
            shutil.rmtree(full)
        (full / "embeddings").mkdir(parents=True)
        os.symlink(inc / "embeddings" / f"run={run_id}", full / "embeddings" / f"run={run_id}")
        (full / "embeddings" / "_LATEST").write_text(run_id)
        full_s = run_pipeline(full, run_id, "full", log)

        # Exact top-10 on 500 new and 500 old images of tonight's collection.
        is_new = np.isin(ids, new_ids)
        q_new = np.sort(rng.choice(np.flatnonzero(is_new), min(SAMPLE, int(is_new.sum())), replace=False))
        q_old = np.sort(rng.choice(np.flatnonzero(~is_new), SAMPLE, replace=False))
        row = {
            "night": night,
            "added": n_add,
            "deleted": n_del,
            "changed": n_chg,
            "incremental_s": round(inc_s, 1),
            "full_s": round(full_s, 1),
        }
        if IO:
            row["io"] = {"incremental": IO.get("incremental"), "full": IO.get("full")}
        exact = {which: exact_topk(x, ids, pos) for which, pos in (("new", q_new), ("old", q_old))}
        for name, root in (("incremental", inc), ("full", full)):
            for which, pos in (("new", q_new), ("old", q_old)):
                tv, ti = exact[which]
                (gv, gi), neighbour_ids, manifest = read_lists(root, run_id, ids[pos])
                row[f"{name}_recall_{which}"] = recall(gi, tv, ti, gv)
                if which == "old":
                    want = np.isin(ti, new_ids)
                    row["reverse_pairs_in_sample"] = int(want.sum())
                    row[f"{'' if name == 'incremental' else 'full_'}reverse_recall"] = round(
                        float((want & (ti[:, :, None] == gi[:, None, :]).any(2)).sum() / max(1, want.sum())), 4
                    )
            row[f"{'deleted_left_in_lists' if name == 'incremental' else 'full_deleted_left_in_lists'}"] = int(
                np.isin(neighbour_ids, deleted_ids).sum()
            )
            if name == "incremental":
                row["lists_changed"] = (manifest.get("changes") or {}).get("lists_changed")
                row["incremental_mode"] = manifest.get("mode")
                row["incremental_manifest"] = {
                    "changes": manifest.get("changes"),
                    "timings": manifest.get("timings"),
                    "wall_seconds": manifest.get("wall_seconds"),
                    "recall_new": manifest.get("recall_new"),
                    "recall_old": manifest.get("recall_old"),
                    "full_reason": manifest.get("full_reason"),
                    "nprobe": manifest.get("nprobe"),
                    "cuts": manifest.get("cuts"),
                }
                idx = json.loads((root / "index" / f"run={run_id}" / "_manifest.json").read_text())
                row["incremental_index"] = {
                    "mode": idx.get("mode"),
                    "full_reason": idx.get("full_reason"),
                    "build_seconds": idx.get("build_seconds"),
                    "timings": idx.get("timings"),
                    "drift": idx.get("drift"),
                }
                row["incremental_stages_s"] = round(float(idx.get("build_seconds") or 0) + float(manifest.get("wall_seconds") or 0), 1)
            else:
                row["full_stages_s"] = round(
                    float(json.loads((root / "index" / f"run={run_id}" / "_manifest.json").read_text())["build_seconds"])
                    + float(manifest.get("wall_seconds") or 0),
                    1,
                )
                # What benchmarks/incremental_projection.py splits into arithmetic and reads.
                row["full_neighbors"] = {k: manifest.get(k) for k in ("method", "nprobe", "wall_seconds", "timings")}
        row["ratio"] = round(inc_s / full_s, 4)
        row["stages_ratio"] = round(row["incremental_stages_s"] / max(row["full_stages_s"], 1e-9), 4)
        out["nights"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("incremental_") or k == "incremental_s"}), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        if args.label or args.data != "mixture" or args.dim != 256:
            label = args.label or (f"mixture{args.dim}_{n}" if args.data == "mixture" else f"{args.data}_{n}")
            results.setdefault("variants", {})[label] = {**out, "code": _commit()}
        elif n == 1_000_000:  # the size: the file's top level
            results.update(out)
        else:
            results.setdefault("other_sizes", {})[str(n)] = out
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"jobs log: {log}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
