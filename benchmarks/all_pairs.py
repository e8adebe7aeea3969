"""All-pairs top-10: this project's index + neighbours jobs against single-node peers.

    python benchmarks/all_pairs.py --n 100000 [--n 1000000] [--fashion] [--real] [--methods cbir,faiss_hnsw,...]

Every method gets the same vectors and the same 2 cores, in a fresh process of its own,
and finds the top-10 of every vector (itself excluded). Recall@10 is measured on the
same 1,000 sampled queries for all, against exact search (faiss IndexFlatIP), with ties
at the 10th score counted as found. Peak RSS is the whole process tree's (Spark: driver
JVM + Python workers), polled every 0.2 s.

- cbir:          ``jobs/pipeline.py --stages build_index,neighbors`` (one Spark session,
                 local[2]), end to end as a user runs it (JVM start-up included), method
                 auto at recall 0.95, no re-ranking, no forests; the input embeddings
                 table is written beforehand and not timed. ``build_s`` is the index
                 stage's own wall time, ``query_s`` the rest. ``CBIR_BENCH_TWO_JOBS=1``
                 with ``--label cbir_two_jobs`` runs the two jobs as two spark-submits.
- cbir_lsh:      the same with ``neighbors.method=lsh`` at its shipped settings (16 tables of 16
                 bits, radius 1). From 1M on the whole run would take hours here, so the index
                 stage runs as a job and the search is the job's own LSH code timed on 10,000
                 queries in two one-thread processes and extrapolated (``info.how``).
- faiss_hnsw:    IndexHNSWFlat M=32, efConstruction 40; efSearch the smallest of 64..1024
                 reaching recall 0.95 on the sample (the sweep is not timed; at 100k, 64).
- faiss_ivf:     IndexIVFFlat, 4 sqrt(N) cells, nprobe 16.
- hnswlib:       M=16, ef_construction 100, ef 100.
- pynndescent:   NNDescent, n_neighbors 11 (a kNN-graph builder: its graph is the answer);
                 numba's compilation is warmed up on 2,000 points first, untimed.
- annoy_single:  one Annoy forest, 50 trees, queried item by item with search_k 5000
                 (the seed's ``nearest_fast``); at N >= 1M a sample of queries is timed
                 and the search extrapolated.
- exact:         faiss IndexFlatIP over everything; at N >= 1M, 20k queries timed and
                 extrapolated.
- spark_brp_lsh: MLlib BucketedRandomProjectionLSH.approxSimilarityJoin (self-join under
                 the distance of the exact 10th neighbour's 95th percentile), then top-10
                 per item; only at N <= --lsh-max-n. bucketLength 0.03 and 8 tables
                 (LSH_BUCKET, LSH_TABLES): unit vectors in 256 dims project with a spread of
                 ~1/16, so near and random pairs differ little in one projection; reaching
                 comparable recall means comparing most pairs, a cost that grows as N^2.

**Data** ``mixture``: a Gaussian mixture (64 diagonal components) fitted to the real
Lite0 embeddings of ../shared/data/clothing-small after PCA to 256 dims, sampled and
L2-normalised. ``real``: those 3,781 real embeddings themselves (1280 dims).
``fashion`` (``--fashion``): the 70,000 Fashion-MNIST images of Debian's
dataset-fashion-mnist (MIT licence; ``apt-get install dataset-fashion-mnist``) embedded
at the shipped defaults (Lite0, R-MAC, 1,280 dims): real CNN embeddings with the cluster
structure graph indexes exploit, which the mixture lacks. The embeddings are extracted
once with this project (``cbir ingest`` + ``cbir extract``) and cached under
benchmarks/.cache/.

Results are merged into benchmarks/results/all_pairs.json (one row per n, data, method).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results" / "all_pairs.json"
CLOTHING = ROOT.parent / "shared" / "data" / "clothing-small"
K = 10
SAMPLE = 1000
METHODS = ("cbir", "cbir_lsh", "faiss_hnsw", "faiss_ivf", "hnswlib", "pynndescent", "annoy_single", "exact", "spark_brp_lsh")
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------ data


def real_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of clothing-small embedded by this project's extract stage (cached)."""
    out = CACHE / "clothing_lite0.npz"
    if out.exists():
        return _cached(out)
    if not CLOTHING.exists():
        raise SystemExit(f"{CLOTHING} is absent: the benchmark's data generator is fitted to it")
    return _embed(CLOTHING, CACHE / "clothing-run", out)


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (MIT licence)


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: big-endian dims after a magic whose last byte is the rank)."""
    import gzip

    raw = gzip.decompress(path.read_bytes())
    rank = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * rank], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * rank :], dtype=np.uint8).reshape(dims)


def fashion_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of Fashion-MNIST's 70,000 images embedded by this project at its defaults (cached).

    The images are written once as PNG files under .cache/fashion-mnist/<split>/<class>/, then go
    through ``cbir ingest`` + ``cbir extract`` as a user's photos would (1,280-d Lite0 R-MAC)."""
    out = CACHE / "fashion_lite0.npz"
    if out.exists():
        return _cached(out)
    if not FASHION.exists():
        raise SystemExit(f"{FASHION} is absent: apt-get install dataset-fashion-mnist")
    from PIL import Image

    pngs = CACHE / "fashion-mnist"
    if not (pngs / "_done").exists():
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = _idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")
            labels = _idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
            for j, (img, label) in enumerate(zip(images, labels, strict=True)):
                d = pngs / split / f"class{label}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / f"{j:05d}.png")
        (pngs / "_done").write_text("")
    return _embed(pngs, CACHE / "fashion-run", out)


def _cached(out: Path) -> tuple[np.ndarray, np.ndarray]:
    z = np.load(out)
    return z["ids"], z["x"]


def _embed(images: Path, root: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    cbir = [sys.executable, "-m", "jobs.cli"]
    for stage in ("ingest", "extract"):
        extra = ["--images", str(images)] if stage == "ingest" else []
        subprocess.run([*cbir, stage, "--output", str(root), "--run-id", "bench", *extra], check=True, cwd=ROOT)
    import pyarrow.parquet as pq

    t = pq.read_table(root / "embeddings" / "run=bench", columns=["image_id", "embedding", "status"])
    t = t.filter(t.column("status").to_numpy(zero_copy_only=False) == "ok")
    ids = t.column("image_id").to_numpy()
    x = np.stack(t.column("embedding").to_pylist()).astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(out, ids=ids, x=x)
    return ids, x


def mixture(n: int, d: int = 256, components: int = 64, seed: int = 0) -> np.ndarray:
    """N unit vectors from a diagonal Gaussian mixture fitted to the real embeddings after PCA-d."""
    path = CACHE / f"mixture_{n}_{d}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    from sklearn.mixture import GaussianMixture

    _, real = real_embeddings()
    mean = real.mean(0)
    _, _, vt = np.linalg.svd(real - mean, full_matrices=False)
    z = (real - mean) @ vt[:d].T
    gmm = GaussianMixture(components, covariance_type="diag", random_state=seed, reg_covar=1e-6).fit(z)
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        comp = rng.choice(components, m, p=gmm.weights_)
        x[s : s + m] = gmm.means_[comp] + rng.normal(size=(m, d)) * np.sqrt(gmm.covariances_[comp])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(path, x)
    return np.load(path, mmap_mode="r")


def dataset(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if name in ("real", "fashion"):
        ids, x = real_embeddings() if name == "real" else fashion_embeddings()
        return ids.astype(np.int64), (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return random_ids(np.random.default_rng(n), n), np.asarray(mixture(n))


def random_ids(rng, n: int) -> np.ndarray:
    """``n`` distinct int64 ids in random order (the mixture's, and incremental.py's)."""
    return rng.permutation(np.unique(rng.integers(-(2**62), 2**62, size=n + 1000))[:n]).astype(np.int64)


def truth(name: str, n: int) -> dict:
    """Exact top-10 of the 1,000 sampled queries (faiss IndexFlatIP), cached."""
    path = CACHE / f"truth_{name}_{n}.npz"
    if path.exists():
        return dict(np.load(path))
    import faiss

    ids, x = dataset(name, n)
    pos = np.sort(np.random.default_rng(7).choice(len(x), min(SAMPLE, len(x)), replace=False))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x))
    v, i = index.search(np.ascontiguousarray(x[pos]), K + 1)
    v, i = _drop_self(v, i, pos)
    out = {"pos": pos, "ids": ids[i], "scores": v}
    np.savez(path, **out)
    return out


def _drop_self(v: np.ndarray, i: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From k+1 results per row, drop the row itself (or the last one) to keep k."""
    keep = i != rows[:, None]
    keep[keep.sum(1) > K, -1] = False
    return v[keep].reshape(len(rows), K), i[keep].reshape(len(rows), K)


def recall(ids_at_pos: np.ndarray, scores_at_pos: np.ndarray, t: dict) -> float:
    from cbir_lib.vectors.topk import recall_at_k

    return recall_at_k(ids_at_pos, t["ids"], t["scores"], scores_at_pos)


# ------------------------------------------------------------------------ workers (one process each)


def _threads() -> int:
    return 2


def w_faiss_hnsw(x, t, ids=None, tmp=None):
    """Build once; pick the smallest efSearch of 64..1024 whose recall on the sample meets
    HNSW_TARGET (default 0.95; the sweep is not timed), then search everything with it."""
    import faiss

    faiss.omp_set_num_threads(_threads())
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.add(x)
    build = time.perf_counter() - t0
    target = float(os.environ.get("HNSW_TARGET", "0.95"))
    sweep = []
    for ef in (64, 128, 256, 512, 1024):
        index.hnsw.efSearch = ef
        v, i = index.search(x[t["pos"]], K + 1)
        r = _recall_at_pos(v, i, t, ids)
        sweep.append({"efSearch": ef, "sample_recall": round(r, 4)})
        if r >= target:
            break
    t0 = time.perf_counter()
    v, i = _search_all(index, x)
    return build, time.perf_counter() - t0, v, i, {"efSearch": index.hnsw.efSearch, "sweep": sweep}


def _recall_at_pos(v, i, t, ids) -> float:
    v, i = _drop_self(np.asarray(v, np.float32), i, t["pos"])
    gi = np.where(i >= 0, ids[np.maximum(i, 0)], -1)
    return recall(gi, np.where(i >= 0, v, -np.inf).astype(np.float32), t)


def w_faiss_ivf(x, t):
    import faiss

    faiss.omp_set_num_threads(_threads())
    nlist = int(4 * np.sqrt(len(x)))
    t0 = time.perf_counter()
    q = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(q, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    train = x[np.random.default_rng(0).choice(len(x), min(len(x), 64 * nlist), replace=False)]
    index.train(train)
    index.add(x)
    build = time.perf_counter() - t0
    index.nprobe = 16
    t0 = time.perf_counter()
    v, i = _search_all(index, x)
    return build, time.perf_counter() - t0, v, i, False


def _search_all(index, x, block: int = 65536):
    vs, is_ = [], []
    for s in range(0, len(x), block):
        v, i = index.search(x[s : s + block], K + 1)
        vs.append(v)
        is_.append(i)
    return np.concatenate(vs), np.concatenate(is_)


def w_exact(x, t):
    import faiss

    faiss.omp_set_num_threads(_threads())
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    if len(x) >= 1_000_000:
        m = 20_000
        t0 = time.perf_counter()
        index.search(x[:m], K + 1)
        secs = (time.perf_counter() - t0) * len(x) / m
        v, i = index.search(x[t["pos"]], K + 1)
        return 0.0, secs, v, i, True
    t0 = time.perf_counter()
    v, i = _search_all(index, x)
    return 0.0, time.perf_counter() - t0, v, i, False


def w_hnswlib(x, t):
    import hnswlib

    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), M=16, ef_construction=100, random_seed=0)
    index.add_items(x, np.arange(len(x)), num_threads=_threads())
    build = time.perf_counter() - t0
    index.set_ef(100)
    t0 = time.perf_counter()
    i, d = index.knn_query(x, k=K + 1, num_threads=_threads())
    return build, time.perf_counter() - t0, 1 - d, i.astype(np.int64), False


def w_pynndescent(x, t):
    os.environ.setdefault("NUMBA_NUM_THREADS", str(_threads()))
    from pynndescent import NNDescent

    # numba compiles on the first call (~55 s measured here): warm it up, untimed.
    _ = NNDescent(x[:2000], metric="dot", n_neighbors=K + 1, random_state=0, n_jobs=_threads(), low_memory=True).neighbor_graph
    t0 = time.perf_counter()
    index = NNDescent(x, metric="dot", n_neighbors=K + 1, random_state=0, n_jobs=_threads(), low_memory=True)
    i, d = index.neighbor_graph
    return time.perf_counter() - t0, 0.0, 1 - d, i.astype(np.int64), False


def w_annoy_single(x, t):
    from annoy import AnnoyIndex

    t0 = time.perf_counter()
    index = AnnoyIndex(x.shape[1], "angular")
    index.set_seed(0)
    for j, v in enumerate(x):
        index.add_item(j, v)
    index.build(50, n_jobs=_threads())
    build = time.perf_counter() - t0
    extrapolate = len(x) >= 1_000_000
    rows = t["pos"] if extrapolate else np.arange(len(x))
    t0 = time.perf_counter()
    res = [index.get_nns_by_item(int(r), K + 1, search_k=5000) for r in rows]
    secs = (time.perf_counter() - t0) * (len(x) / len(rows))
    i = np.full((len(rows), K + 1), -1, dtype=np.int64)
    for r, nn in enumerate(res):
        i[r, : len(nn)] = nn
    v = np.einsum("rj,rkj->rk", x[rows], x[np.maximum(i, 0)])
    v[i < 0] = -np.inf
    return build, secs, v, i, extrapolate


def write_embeddings(
    root: Path,
    ids: np.ndarray,
    x: np.ndarray,
    run_id: str = "bench",
    sha: list[str] | None = None,
    commit_id: str | None = None,
    fresh: np.ndarray | None = None,
) -> None:
    """The vectors as an extract stage's committed embeddings run ``run_id`` under ``root``
    (untimed; a run already there is replaced). ``sha``: a ``content_sha256`` per row (what
    tells an incremental index a changed image; by default the vector's own bytes' hash,
    as every extract run has one), ``commit_id``: the manifest's commit id. ``fresh``: the
    rows embedded for this run's images (new and changed), written after the others in
    files of their own, as extract writes them since 2026-12-07."""
    import hashlib
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cbir_lib.vectors.arrow import vectors_array

    if sha is None:
        sha = [hashlib.sha256(v.tobytes()).hexdigest() for v in np.asarray(x, np.float32)]
    emb = root / "embeddings" / f"run={run_id}"
    if emb.exists():
        shutil.rmtree(emb)
    emb.mkdir(parents=True)
    # One file per extract shard (extract.shard_size), as `cbir extract` commits them: until
    # 2026-12-04 this wrote 200,000 rows a file, a layout extract never makes, which the
    # index stage reads one file per thread (Fashion's 70k in one file: 1.0 s; in 7: 0.4 s).
    from cbir_lib.config import ExtractConfig

    step = ExtractConfig().shard_size
    groups = [np.arange(len(x))] if fresh is None else [np.flatnonzero(~fresh), np.flatnonzero(fresh)]
    sha = np.asarray(sha, dtype=object)
    part = 0
    for rows in groups:
        for s in range(0, len(rows), step):
            r = rows[s : s + step]
            m = len(r)
            cols = {"image_id": pa.array(ids[r])}
            cols["content_sha256"] = pa.array(sha[r].tolist(), pa.string())
            cols.update(
                {
                    "embedding": vectors_array(np.asarray(x[r])),
                    "dim": pa.array(np.full(m, x.shape[1], dtype=np.int32)),
                    "status": pa.array(["ok"] * m),
                    "error": pa.array([None] * m, pa.string()),
                }
            )
            pq.write_table(pa.table(cols), emb / f"part-{part:05d}.parquet")
            part += 1
    # The fields an extract run's manifest always has that the index stage reads: without
    # ``counts`` it counted the rows itself, a pass over every vector no user's run pays.
    manifest = {"stage": "extract", "run_id": run_id, "dim": int(x.shape[1]), "counts": {"input": len(x), "ok": len(x), "failed": 0}}
    if commit_id is not None:
        manifest["commit_id"] = commit_id
    (emb / "_manifest.json").write_text(json.dumps(manifest))
    (root / "embeddings" / "_LATEST").write_text(run_id)


def _job_args(root: Path) -> list[str]:
    """The arguments every timed cbir job here runs with: the output root, local[2], 8g, run id bench."""
    return ["--output", str(root), "--master", "local[2]", "--set", "spark.conf.spark.driver.memory=8g", "--run-id", "bench"]


def w_cbir(x, t, ids=None, tmp=None):
    """Write the embeddings table (untimed), then time the two jobs as subprocesses."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(tmp)
    write_embeddings(root, ids, x)
    # The untimed input's dirty pages go to disk now, not by the kernel's writeback during
    # the timed run (250 MB at Fashion); no peer writes anything before its clock starts.
    os.sync()
    common = _job_args(root)
    extra = os.environ.get("CBIR_BENCH_ARGS", "").split()
    index_args = ["index.forests=false", *[a for a in extra if a.startswith("index.")]]
    nb_args = [
        "neighbors.method=auto",
        "neighbors.min_recall=0.95",
        "neighbors.rerank=none",
        *[a for a in extra if a.startswith("neighbors.")],
    ]
    times = {}
    if os.environ.get("CBIR_BENCH_TWO_JOBS"):  # one spark-submit per stage, as before jobs/pipeline.py
        runs = (
            ("build_index", [str(ROOT / "jobs" / "build_index.py"), *common, *index_args]),
            ("neighbors", [str(ROOT / "jobs" / "neighbors.py"), *common, *nb_args]),
        )
    else:  # both stages in one session
        runs = (("pipeline", [str(ROOT / "jobs" / "pipeline.py"), "--stages", "build_index,neighbors", *common, *index_args, *nb_args]),)
    for job, cmd in runs:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
        times[job] = time.perf_counter() - t0
        if out.returncode:
            raise SystemExit(f"{job} failed:\n{out.stderr[-4000:]}")
        sys.stderr.write(out.stderr[-2500:])
        if os.environ.get("CBIR_BENCH_LOG"):  # the job's whole log, for a timeline of its steps
            with open(os.environ["CBIR_BENCH_LOG"], "a") as fh:
                fh.write(out.stderr)
        times[job + "_summary"] = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    index_manifest = json.loads((root / "index" / "run=bench" / "_manifest.json").read_text())
    if "pipeline" in times:  # the index stage's own wall time, the rest (JVM start included) to the search
        times["build_index"] = index_manifest["build_seconds"]
        times["neighbors"] = times["pipeline"] - times["build_index"]
    from cbir_lib.neighbors.lists import topk_arrays

    nb = pq.read_table(root / "neighbors" / "run=bench", columns=["image_id", "rank", "neighbor_id", "score"])
    qids = ids[t["pos"]]
    gv, gi = topk_arrays(nb.filter(pa.array(np.isin(nb.column("image_id").to_numpy(), qids))), qids, K)
    manifest = json.loads((root / "neighbors" / "run=bench" / "_manifest.json").read_text())
    return (
        times["build_index"],
        times["neighbors"],
        gv,
        gi,
        {
            "manifest_recall": manifest.get("recall_at_k"),
            "nprobe": manifest.get("nprobe"),
            "timings": manifest.get("timings"),
            "memory": manifest.get("memory"),
            "method": manifest.get("method"),
            "jobs": [job for job in ("pipeline", "build_index", "neighbors") if job + "_summary" in times],
            "index": {
                "n_cells": index_manifest["n_cells"],
                "timings": index_manifest.get("timings"),
                "reduction": index_manifest.get("reduction"),
                "build_seconds": index_manifest.get("build_seconds"),
            },
        },
    )


# cbir_lsh: from this N on, the search is timed on a sample and extrapolated (the variable: to try it small)
LSH_SAMPLED_FROM = int(os.environ.get("CBIR_BENCH_LSH_SAMPLED_FROM", 1_000_000))
LSH_SAMPLE = 10_000


def w_cbir_lsh(x, t, ids=None, tmp=None):
    """``neighbors.method=lsh`` at its shipped settings. Below LSH_SAMPLED_FROM: the cbir
    pipeline end to end, as ``cbir``. From it on, the whole run would take hours here (a
    bucket's rows grow with N, so the candidates per query do too), so:

    - the index stage runs as a job, timed whole (``build_s``, with the tables' build);
    - two processes of one thread each (local[2]'s two tasks) each build the hash tables over
      all N vectors, exactly as each task of the job does (``lsh.LSHIndex``), and search half
      of LSH_SAMPLE queries (the 1,000 recall queries among them) with the job's own
      ``lsh_topk``; the slower one's search time is scaled by N / LSH_SAMPLE;
    - the neighbours job's other work (loading the store, the exact recall sample, writing) is
      not in the figure, so it is a lower bound of the job's time."""
    if len(x) < LSH_SAMPLED_FROM:
        os.environ["CBIR_BENCH_ARGS"] = f"{os.environ.get('CBIR_BENCH_ARGS', '')} neighbors.method=lsh".strip()
        return w_cbir(x, t, ids=ids, tmp=tmp)
    import multiprocessing as mp

    from cbir_lib.config import Config

    root = Path(tmp)
    write_embeddings(root, ids, x)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "build_index.py"), *_job_args(root), "index.forests=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    index_s = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"build_index failed:\n{out.stderr[-4000:]}")
    nb, ic = Config().neighbors, Config().index
    params = {"tables": nb.lsh_tables, "bits": nb.lsh_bits, "radius": nb.lsh_radius, "seed": ic.seed}
    rng = np.random.default_rng(11)
    rest = np.setdiff1d(np.arange(len(x)), t["pos"])
    rows = np.sort(np.concatenate([t["pos"], rng.choice(rest, max(0, min(LSH_SAMPLE, len(x)) - len(t["pos"])), replace=False)]))
    global _LSH_JOB
    _LSH_JOB = (x, ids, params)
    with mp.get_context("fork").Pool(2) as pool:
        parts = pool.map(_lsh_part, np.array_split(rows, 2))
    tables_s = max(p["tables_s"] for p in parts)
    search_s = max(p["search_s"] for p in parts)
    scores = np.concatenate([p["scores"] for p in parts])
    found = np.concatenate([p["ids"] for p in parts])
    at = np.searchsorted(rows, t["pos"])
    projected = search_s * len(x) / len(rows)
    info = {
        "how": f"index stage timed whole; hash tables built over all {len(x)} vectors and {len(rows)} sampled queries searched "
        f"by the job's own LSHIndex/lsh_topk in 2 one-thread processes (local[2]'s tasks); search scaled by N / sample. "
        "The neighbours job's store load, recall sample and write are not included: a lower bound",
        "lsh": params,
        "index_stage_s": round(index_s, 2),
        "tables_s": round(tables_s, 2),
        "sample": len(rows),
        "sample_search_s": round(search_s, 2),
        "candidates_per_query": round(float(np.mean(np.concatenate([p["counts"] for p in parts]))), 1),
        "table_bytes": parts[0]["nbytes"],
        "extrapolated": True,
    }
    return index_s + tables_s, projected, scores[at], found[at], info


_LSH_JOB = None


def _lsh_part(rows):
    from threadpoolctl import threadpool_limits

    from cbir_lib.neighbors.lsh import LSHIndex, lsh_topk

    x, ids, p = _LSH_JOB
    with threadpool_limits(1):
        t0 = time.perf_counter()
        index = LSHIndex(x, p["tables"], p["bits"], p["seed"])
        tables_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_s, out_i, counts = [], [], []
        for s in range(0, len(rows), 250):
            r = rows[s : s + 250]
            v, i, c = lsh_topk(index, x, ids, x[r], ids[r], K, p["radius"])
            out_s.append(v)
            out_i.append(i)
            counts.append(c)
        search_s = time.perf_counter() - t0
    return {
        "tables_s": tables_s,
        "search_s": search_s,
        "scores": np.concatenate(out_s),
        "ids": np.concatenate(out_i),
        "counts": np.concatenate(counts),
        "nbytes": index.nbytes,
    }


def w_spark_brp_lsh(x, t, ids=None, tmp=None):
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.window import Window

    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.driver.memory", "8g")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    # Threshold: 95th percentile of the exact 10th-neighbour distance (unit vectors).
    thr = float(np.percentile(np.sqrt(np.maximum(2 - 2 * t["scores"][:, -1], 0)), 95))
    df = spark.createDataFrame([(j, Vectors.dense(v.tolist())) for j, v in enumerate(x)], ["id", "features"]).repartition(8).cache()
    df.count()
    t0 = time.perf_counter()
    bucket = float(os.environ.get("LSH_BUCKET", "0.03"))
    tables_ = int(os.environ.get("LSH_TABLES", "8"))
    model = BucketedRandomProjectionLSH(inputCol="features", outputCol="hashes", bucketLength=bucket, numHashTables=tables_, seed=0).fit(df)
    hashed = model.transform(df).cache()
    hashed.count()
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = (
        model.approxSimilarityJoin(hashed, hashed, thr, distCol="dist")
        .select(F.col("datasetA.id").alias("a"), F.col("datasetB.id").alias("b"), "dist")
        .filter("a != b")
    )
    w = Window.partitionBy("a").orderBy("dist", "b")
    top = pairs.withColumn("r", F.row_number().over(w)).filter(F.col("r") <= K)
    top.write.mode("overwrite").parquet(str(Path(tmp) / "lsh"))
    secs = time.perf_counter() - t0
    got = spark.read.parquet(str(Path(tmp) / "lsh")).filter(F.col("a").isin([int(p) for p in t["pos"]])).collect()
    spark.stop()
    posrow = {int(p): r for r, p in enumerate(t["pos"])}
    i = np.full((len(t["pos"]), K + 1), -1, np.int64)
    v = np.full((len(t["pos"]), K + 1), -np.inf, np.float32)
    for row in got:
        i[posrow[row.a], row.r - 1] = row.b
        v[posrow[row.a], row.r - 1] = 1 - row.dist**2 / 2
    return build, secs, v, i, {"bucketLength": bucket, "numHashTables": tables_, "threshold": round(thr, 4)}


WORKERS = {
    "faiss_hnsw": w_faiss_hnsw,
    "faiss_ivf": w_faiss_ivf,
    "hnswlib": w_hnswlib,
    "pynndescent": w_pynndescent,
    "annoy_single": w_annoy_single,
    "exact": w_exact,
    "cbir": w_cbir,
    "cbir_lsh": w_cbir_lsh,
    "spark_brp_lsh": w_spark_brp_lsh,
}


def worker(method: str, data: str, n: int) -> None:
    ids, x = dataset(data, n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    t = truth(data, n)
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
        if method in ("cbir", "cbir_lsh", "spark_brp_lsh", "faiss_hnsw"):
            build, query, v, i, extra = WORKERS[method](x, t, ids=ids, tmp=tmp)
        else:
            build, query, v, i, extra = WORKERS[method](x, t)
    info = extra if isinstance(extra, dict) else {}
    extrapolated = extra is True or bool(info.pop("extrapolated", False))
    if method in ("cbir", "cbir_lsh"):
        gv, gi = v, i  # already image ids at the sampled positions, self excluded
    else:
        if len(i) == len(x):
            v, i = v[t["pos"]], i[t["pos"]]
        v, i = _drop_self(np.asarray(v, np.float32), i, t["pos"])
        gi = np.where(i >= 0, ids[np.maximum(i, 0)], -1)
        gv = np.where(i >= 0, v, -np.inf).astype(np.float32)
    print(
        json.dumps(
            {
                "build_s": round(build, 2),
                "query_s": round(query, 2),
                "recall_at_10": round(recall(gi, gv, t), 4),
                "extrapolated": extrapolated,
                **({"info": info} if info else {}),
            }
        )
    )


# ------------------------------------------------------------------------ driver


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def watch_peak_rss(pid: int, every: float = 0.2):
    """Poll the process tree's RSS in a thread: ``(peak [bytes], stop event, thread)``."""
    peak = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(pid))
            time.sleep(every)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    return peak, stop, th


def run_method(method: str, data: str, n: int, timeout: int, memory_budget: str | None = None) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    if memory_budget:
        env["CBIR_BENCH_ARGS"] = f"{env.get('CBIR_BENCH_ARGS', '')} neighbors.memory_budget={memory_budget}".strip()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", method, "--data", data, "--n", str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    peak, stop, th = watch_peak_rss(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        for c in psutil.Process(proc.pid).children(recursive=True):
            c.kill()
        proc.kill()
        out, err = proc.communicate()
        stop.set()
        return {
            "n": n,
            "dim": None,
            "data": data,
            "method": method,
            "status": f"did not finish in {timeout} s",
            "peak_rss_mb": round(peak[0] / 2**20),
        }
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(err[-3000:])
        return {"n": n, "data": data, "method": method, "status": f"failed (exit {proc.returncode})", "error": err[-500:]}
    r = json.loads(out.strip().splitlines()[-1])
    row = {
        "n": n,
        "dim": None,
        "data": data,
        "method": method,
        "build_s": r["build_s"],
        "query_s": r["query_s"],
        "total_s": round(r["build_s"] + r["query_s"], 2),
        "recall_at_10": r["recall_at_10"],
        "peak_rss_mb": round(peak[0] / 2**20),
        "extrapolated": r["extrapolated"],
        "process_wall_s": round(wall, 1),
    }
    if "info" in r:
        row["info"] = r["info"]
        held = (r["info"].get("memory") or {}).get("max_held_bytes")
        if held:
            row["largest_store_share_mb"] = round(held / 2**20, 1)
    if memory_budget:
        from cbir_lib.common.inprocess import bytes_of

        row["memory_budget_mb"] = round((bytes_of(memory_budget) or 0) / 2**20)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="collection sizes (mixture data); default 100000")
    ap.add_argument("--real", action="store_true", help="also run on the real clothing-small embeddings")
    ap.add_argument("--fashion", action="store_true", help="also run on Fashion-MNIST's 70,000 real 1,280-d embeddings")
    ap.add_argument("--label", help="cbir only: record the row under this method name (e.g. cbir_two_jobs)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lsh-max-n", type=int, default=100_000)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per method before it is recorded as unfinished")
    ap.add_argument("--lsh-timeout", type=int, default=900, help="the same for spark_brp_lsh")
    ap.add_argument("--memory-budget", help="cbir only: neighbors.memory_budget (e.g. 1g); the row records memory_budget_mb")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="mixture", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.data, (args.n or [0])[0])
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: {', '.join(METHODS)}")
    plans = [("mixture", n) for n in (args.n or [100_000])]
    if args.real:
        plans.insert(0, ("real", 0))
    if args.fashion:
        plans.insert(0, ("fashion", 0))
    if args.n is None and (args.real or args.fashion):
        plans = [p for p in plans if p[0] != "mixture"]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    for data, key in plans:
        ids, x = dataset(data, key)
        n, dim = len(x), x.shape[1]
        truth(data, key)
        for method in methods:
            if method == "spark_brp_lsh" and n > args.lsh_max_n:
                continue
            budget = args.memory_budget if method == "cbir" else None
            row = run_method(method, data, key, args.lsh_timeout if method == "spark_brp_lsh" else args.timeout, budget)
            row["n"], row["dim"] = n, dim
            if args.label and method == "cbir":
                row["method"] = args.label
            same = (n, data, row["method"], row.get("memory_budget_mb"))
            results["runs"] = [r for r in results["runs"] if (r["n"], r["data"], r["method"], r.get("memory_budget_mb")) != same] + [row]
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "info"}), flush=True)
        _ratios(results, data, n)


def _ratios(results: dict, data: str, n: int) -> None:
    rows = {
        r["method"]: r for r in results["runs"] if r["n"] == n and r["data"] == data and "total_s" in r and not r.get("memory_budget_mb")
    }
    budgeted = [r for r in results["runs"] if r["n"] == n and r["data"] == data and "total_s" in r and r.get("memory_budget_mb")]
    for r in budgeted:
        base_ = rows.get(r["method"])
        print(
            f"{data} n={n}: {r['method']} under a {r['memory_budget_mb']} MB budget: total {r['total_s']} s, recall {r['recall_at_10']}, "
            f"largest store share {r.get('largest_store_share_mb')} MB"
            + (f" -> {r['total_s'] / base_['total_s']:.2f}x unbudgeted" if base_ else "")
        )
    base = rows.get("cbir")
    if not base:
        return
    print(f"\n{data} n={n}: cbir total {base['total_s']} s at recall {base['recall_at_10']}")
    for m, r in sorted(rows.items()):
        if m != "cbir":
            print(
                f"  {m:14s} total {r['total_s']:9.1f} s  recall {r['recall_at_10']:.4f}  "
                f"-> {r['total_s'] / base['total_s']:.2f}x cbir's time" + ("  (extrapolated)" if r.get("extrapolated") else "")
            )


if __name__ == "__main__":
    main()
