"""Retrieval quality and near-duplicate detection on real photos (clothing-small).

    python benchmarks/quality.py [--retrieval] [--backbones] [--other] [--stages] [--pipeline] [--dedup]   (default: all)

backbones: Lite0/1/2 x pooling x re-ranking (none, DBA+alpha-QE, k-reciprocal, both) at
  center_crop, P@10, mAP@10 and full mAP; and k-reciprocal's parameters swept.
other: each backbone on another kind of photo (the demo sample and its edited copies).
stages: each backbone through the real stages one after the other on the same cores:
  extract img/s, build_index + neighbours seconds (and with k-reciprocal), split evaluation.

retrieval: Lite0 feature maps of all 3,781 images are computed once (cached), then every
  pooling (GAP, GeM, MAC, CroW, R-MAC) x resize (squash, center_crop) x whitening x
  re-ranking (none, AQE, alpha-QE, DBA, DBA+alpha-QE) is scored with the test split as
  queries against the train split: P@10 and standard mAP@10 (cbir_lib.evaluate.metrics).
  Baseline: the old default (squash, GAP, no re-ranking), measured in the same run.
pipeline: the shipped default end to end (cbir ingest, extract, evaluate split).
dedup: 300 train photos, each with 14 edited copies (the demo's crop, flip, rotate,
  rescale, JPEG q20, brighten, overlay text, and cbir_lib.edits' heavy crop, quarter turn,
  canvas padding, meme canvas, rotation + shear, greyscale, blur + noise, strengths drawn
  per copy), mixed into the other 3,481 photos as distractors; the pipeline runs (ingest,
  extract, index, neighbours), then dedup at the shipped default (verify=band), at
  verify=all, at the rules alone (verify=off, thresholds swept offline on loose pairs) and
  at variants of the band; pair precision/recall overall and per transform, and the CPU
  seconds per image of dedup and of extract on the same photos.

Results go to benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "benchmarks" / ".cache"
CLOTHING = ROOT.parent / "shared" / "data" / "clothing-small"
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
CBIR = [sys.executable, "-m", "jobs.cli"]


def paths() -> list[str]:
    return sorted(str(p) for p in CLOTHING.rglob("*.jpg"))


BACKBONES = ("lite0", "lite1", "lite2")


def feature_maps(resize: str, mirrored: bool = False, backbone: str = "lite0") -> np.ndarray:
    """A backbone's feature maps of every clothing-small photo (of its mirror image if
    ``mirrored``), at the backbone's native size."""
    out = CACHE / f"clothing_fmaps_{backbone}_{resize}{'_mirrored' if mirrored else ''}.npy"
    if out.exists():
        return np.load(out, mmap_mode="r")
    from cbir_lib.config import ExtractConfig
    from cbir_lib.features.embedder import Embedder, EmbedSpec
    from cbir_lib.images.decode import decode_for_model
    from cbir_lib.models.backbones import resolve_artifact

    art = resolve_artifact(ExtractConfig(model=f"efficientnet-{backbone}"))
    emb = Embedder(EmbedSpec(artifact=art, resize=resize), art.local_path)
    files = paths()
    maps = []
    for s in range(0, len(files), 32):
        imgs = np.stack([decode_for_model(open(p, "rb").read(), art.image_size, resize)[0] for p in files[s : s + 32]])
        if mirrored:
            imgs = imgs[:, :, ::-1].copy()
        maps.append(emb.feature_maps(imgs).astype(np.float16))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(out, np.concatenate(maps))
    return np.load(out, mmap_mode="r")


def score(q, g, lq, lg, k=10, order=None) -> tuple[float, float]:
    """P@k and mAP@k of queries ``q`` against gallery ``g``: ranked by score, or by ``order``
    (each query's gallery positions, as k-reciprocal re-ranking gives)."""
    from cbir_lib.evaluate import metrics

    if order is None:
        s = q @ g.T
        order = np.argsort(-s, axis=1, kind="stable")
    top = order[:, :k]
    rel = metrics.relevance(lq, lg[top])
    n_rel = (lg[None, :] == lq[:, None]).sum(1)
    m = metrics.summarise(metrics.per_query(rel, n_rel, k))
    return round(m["precision_at_k"], 4), round(m["map_at_k"], 4)


def full_map(q, g, lq, lg, order=None) -> float:
    from cbir_lib.evaluate import metrics

    if order is None:
        order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    rel = lg[order] == lq[:, None]
    return round(float(np.mean(metrics.average_precision(rel, rel.sum(1)))), 4)


KR = {"k1": 20, "k2": 6, "lam": 0.3, "depth": 40}  # the config's defaults (neighbors.kr_*)


def rerank_score(y, tr, te, label, mode: str, kr: dict = KR, with_map: bool = False) -> dict:
    """One row's figures: the vector re-ranking, then k-reciprocal when the mode asks."""
    from cbir_lib.neighbors import kreciprocal
    from cbir_lib.neighbors.rerank import exact_rerank, split_mode

    q, g = exact_rerank(y[te], y[tr], mode, 10, 3.0)
    order = kreciprocal.split_order(q, g, kr["depth"], kr["k1"], kr["k2"], kr["lam"]) if split_mode(mode)[1] else None
    p10, map10 = score(q, g, label[te], label[tr], order=order)
    row = {"p_at_10": p10, "map_at_10": map10}
    if with_map:
        row["map"] = full_map(q, g, label[te], label[tr], order)
    return row


def pooled(fm, pooling: str) -> np.ndarray:
    from cbir_lib.features.pooling import pool

    return np.concatenate([pool(np.asarray(fm[i : i + 256], np.float32), pooling) for i in range(0, len(fm), 256)])


def labels():
    files = paths()
    split = np.array([p.split("/")[-3] for p in files])
    label = np.array([p.split("/")[-2] for p in files])
    return split == "train", split == "test", label


def retrieval() -> list[dict]:
    from cbir_lib.features.postprocess import Whitening

    tr, te, label = labels()
    rows = []
    for resize in ("squash", "center_crop"):
        fm = feature_maps(resize)
        for pooling in ("gap", "gem", "mac", "crow", "rmac"):
            x = pooled(fm, pooling)
            variants = [("", x)]
            if pooling in ("gap", "rmac"):
                variants.append(("+pcaw256", Whitening.fit(x[tr], 256, shrinkage=0.1).apply(x).astype(np.float32)))
            for wname, y in variants:
                modes = (
                    ("none", "aqe", "alpha_qe", "dba", "dba+alpha_qe", "k_reciprocal", "dba+alpha_qe+k_reciprocal")
                    if not wname
                    else ("none", "dba+alpha_qe")
                )
                for mode in modes:
                    rows.append({"method": f"lite0 {resize} {pooling}{wname} rerank={mode}", **rerank_score(y, tr, te, label, mode)})
                    print(rows[-1], flush=True)
    return rows


def backbone_grid() -> list[dict]:
    """Every backbone x pooling x re-ranking at center_crop: P@10, mAP@10 and full mAP."""
    tr, te, label = labels()
    rows = []
    for backbone in BACKBONES:
        fm = feature_maps("center_crop", backbone=backbone)
        for pooling in ("gap", "gem", "crow", "rmac"):
            x = pooled(fm, pooling)
            for mode in ("none", "dba+alpha_qe", "k_reciprocal", "dba+alpha_qe+k_reciprocal"):
                rows.append(
                    {
                        "method": f"{backbone} center_crop {pooling} rerank={mode}",
                        "backbone": backbone,
                        **rerank_score(x, tr, te, label, mode, with_map=True),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def kr_sweep(backbone: str = "lite0") -> list[dict]:
    """k-reciprocal's parameters around the paper's (k1 20, k2 6, lambda 0.3), on R-MAC."""
    tr, te, label = labels()
    x = pooled(feature_maps("center_crop", backbone=backbone), "rmac")
    rows = []
    for k1, k2, lam, depth in (
        (20, 6, 0.3, 40),
        (20, 6, 0.3, 80),
        (20, 6, 0.3, 25),
        (10, 3, 0.3, 40),
        (30, 6, 0.3, 60),
        (20, 1, 0.3, 40),
        (20, 6, 0.1, 40),
        (20, 6, 0.5, 40),
    ):
        kr = {"k1": k1, "k2": k2, "lam": lam, "depth": depth}
        for mode in ("k_reciprocal", "dba+alpha_qe+k_reciprocal"):
            rows.append({"backbone": backbone, "mode": mode, **kr, **rerank_score(x, tr, te, label, mode, kr)})
            print(rows[-1], flush=True)
    return rows


def _latest(out: Path, table: str, name: str = "_manifest.json") -> dict:
    """A JSON file of a table's latest snapshot under ``out``."""
    run = (out / table / "_LATEST").read_text().strip()
    return json.loads((out / table / f"run={run}" / name).read_text())


def _split_metrics(out: Path, *settings: str) -> dict:
    """``cbir evaluate evaluate.mode=split`` with ``settings``: P@10, mAP@10 and full mAP."""
    subprocess.run([*CBIR, "evaluate", *settings, "evaluate.mode=split", "--output", str(out)], cwd=ROOT, check=True, capture_output=True)
    m = _latest(out, "evaluation", "metrics.json")
    return {"p_at_10": round(m["precision_at_k"], 4), "map_at_10": round(m["map_at_k"], 4), "map": round(m["map"], 4)}


def stages() -> list[dict]:
    """Each backbone through the real stages on the same cores, one after the other: ingest
    once, then extract (img/s from its manifest), build_index + neighbours at the shipped
    settings (seconds, JVM start included), and the split evaluation."""
    out = CACHE / "clothing-stages"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([*CBIR, "ingest", "--images", str(CLOTHING), "--output", str(out)], cwd=ROOT, check=True, capture_output=True)
    rows = []
    for backbone in BACKBONES:
        model = f"extract.model=efficientnet-{backbone}"
        t0 = time.time()
        subprocess.run([*CBIR, "extract", model, "--output", str(out)], cwd=ROOT, check=True, capture_output=True)
        extract_s = time.time() - t0
        em = _latest(out, "embeddings")
        t0 = time.time()
        for stage in ("build_index", "neighbors"):
            subprocess.run([*CBIR, stage, model, "--output", str(out)], cwd=ROOT, check=True, capture_output=True)
        neighbors_s = time.time() - t0
        t0 = time.time()
        subprocess.run(
            [*CBIR, "neighbors", model, "neighbors.rerank=dba+alpha_qe+k_reciprocal", "--output", str(out)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        neighbors_kr_s = time.time() - t0
        kr_timing = _latest(out, "neighbors")["timings"].get("k_reciprocal_s")
        ev = [
            {"rerank": mode, **_split_metrics(out, model, f"neighbors.rerank={mode}")}
            for mode in ("dba+alpha_qe", "dba+alpha_qe+k_reciprocal")
        ]
        rows.append(
            {
                "backbone": backbone,
                "images": em.get("counts", {}).get("ok"),
                "extract_s": round(extract_s, 1),
                "extract_ips": em.get("images_per_second"),
                "embed_seconds": em.get("embed_seconds"),
                "neighbors_s": round(neighbors_s, 1),
                "neighbors_with_k_reciprocal_s": round(neighbors_kr_s, 1),
                "k_reciprocal_step_s": kr_timing,
                "evaluate_split": ev,
            }
        )
        print(rows[-1], flush=True)
    return rows


def other_photos() -> list[dict]:
    """Another kind of photo: the demo sample (scikit-image's photographs: a portrait, a cat,
    coffee, a rocket, a motorcycle, deep field, a retina, a micrograph, a camera, the moon),
    each with its 7 edited copies. Every photo queries the other 79; P@7 is the share of its
    group's other 7 among its top 7. Per backbone (center_crop, R-MAC), re-ranking none and
    the default's."""
    import csv

    from cbir_lib.config import ExtractConfig
    from cbir_lib.evaluate import metrics
    from cbir_lib.features.embedder import Embedder, EmbedSpec
    from cbir_lib.images.decode import decode_for_model
    from cbir_lib.models.backbones import resolve_artifact
    from cbir_lib.neighbors.rerank import exact_rerank
    from cbir_lib.sample import images_dir, make_sample

    d = CACHE / "demo-sample"
    make_sample(str(d))
    rows_csv = list(csv.DictReader(open(d / "groups.csv")))
    files = [os.path.join(images_dir(str(d)), r["file"]) for r in rows_csv]
    group = np.array([r["group"] for r in rows_csv])
    out = []
    # Each backbone (center_crop, R-MAC), then the seeds' colour histogram (extract.model=color_hist,
    # HSV 8x12x3, whole image and 2 x 2 grid: a centred histogram, so cosine is Pearson correlation).
    settings = [(b, ExtractConfig(model=f"efficientnet-{b}"), "rmac") for b in BACKBONES]
    settings += [(f"color_hist 8x12x3 grid {g}", ExtractConfig(model="color_hist", hist_bins="8x12x3", hist_grid=g), "gap") for g in (1, 2)]
    for backbone, ecfg, pooling in settings:
        art = resolve_artifact(ecfg)
        emb = Embedder(EmbedSpec(artifact=art, resize="center_crop", pooling=pooling), art.local_path)
        imgs = np.stack([decode_for_model(open(p, "rb").read(), art.image_size, "center_crop")[0] for p in files])
        x = np.concatenate([pooled(emb.feature_maps(imgs[i : i + 16]), pooling) for i in range(0, len(imgs), 16)])
        for mode in ("none", "dba+alpha_qe"):
            q, g = exact_rerank(x, x, mode, 10, 3.0, q_in_g=True)
            s = q @ g.T
            np.fill_diagonal(s, -np.inf)
            top = np.argsort(-s, axis=1, kind="stable")[:, :7]
            rel = metrics.relevance(group, group[top])
            m = metrics.summarise(metrics.per_query(rel, np.full(len(group), 7), 7))
            out.append({"backbone": backbone, "rerank": mode, "p_at_7": round(m["precision_at_k"], 4), "map_at_7": round(m["map_at_k"], 4)})
            print(out[-1], flush=True)
    return out


def seed_methods() -> list[dict]:
    """The seeds' methods through the real stages, in one run on the same cores: the colour
    histogram (extract.model=color_hist, whole image and 2 x 2 grid; img/s from extract's
    manifest) evaluated like any backbone, with and without the default re-ranking."""
    out = CACHE / "clothing-seeds"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([*CBIR, "ingest", "--images", str(CLOTHING), "--output", str(out)], cwd=ROOT, check=True, capture_output=True)
    rows = []
    for grid in (1, 2):
        setting = ["extract.model=color_hist", "extract.hist_bins=8x12x3", f"extract.hist_grid={grid}"]
        t0 = time.time()
        subprocess.run([*CBIR, "extract", *setting, "--output", str(out)], cwd=ROOT, check=True, capture_output=True)
        extract_s = time.time() - t0
        em = _latest(out, "embeddings")
        for mode in ("none", "dba+alpha_qe"):
            rows.append(
                {
                    "method": f"color_hist hsv 8x12x3 grid {grid} rerank={mode}",
                    "dim": em["dim"],
                    **_split_metrics(out, *setting, f"neighbors.rerank={mode}"),
                    "extract_ips": em.get("images_per_second"),
                    "extract_s": round(extract_s, 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def pwa_grid(backbone: str = "lite1") -> list[dict]:
    """PWA pooling (Xu et al. 2018) on cached feature maps, as extract.pooling=pwa computes it:
    the part channels chosen from 500 train images, parts x 1,280 dims, and PCA-whitened to
    1,280 (by an SVD of the centred train split: the stage's Whitening builds a d x d
    covariance, too big at 10k-32k dims), with and without the default re-ranking."""
    from cbir_lib.features.pooling import l2_normalize, pwa, pwa_select

    tr, te, label = labels()
    fm = feature_maps("center_crop", backbone=backbone)
    sums = np.concatenate([np.asarray(fm[i : i + 256], np.float32).sum(axis=(1, 2)) for i in range(0, len(fm), 256)])
    sample = np.random.default_rng(0).choice(np.flatnonzero(tr), 500, replace=False)
    rows = []
    for parts in (2, 4, 8, 16, 25):
        ch = pwa_select(sums[sample], parts)
        t0 = time.time()
        x = np.concatenate([pwa(np.asarray(fm[i : i + 64], np.float32), ch) for i in range(0, len(fm), 64)])
        pool_s = time.time() - t0
        mu = x[tr].mean(0)
        _, sv, vt = np.linalg.svd(x[tr] - mu, full_matrices=False)
        ev = sv[:1280] ** 2 / (tr.sum() - 1)
        proj = vt[:1280] / np.sqrt(ev + 0.1 * ev.max())[:, None]
        for wname, y in (("", x), ("+pcaw1280", l2_normalize(((x - mu) @ proj.T).astype(np.float32)))):
            for mode in ("none", "dba+alpha_qe"):
                rows.append(
                    {
                        "method": f"{backbone} center_crop pwa parts={parts}{wname} rerank={mode}",
                        "dim": int(y.shape[1]),
                        **rerank_score(y, tr, te, label, mode, with_map=True),
                        "pool_s": round(pool_s, 1),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def pipeline() -> dict:
    out = CACHE / "clothing-pipeline"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    for args in (["ingest", "--images", str(CLOTHING)], ["extract"], ["evaluate", "evaluate.mode=split"]):
        subprocess.run([*CBIR, *args, "--output", str(out)], cwd=ROOT, check=True, capture_output=True)
    run = (out / "evaluation" / "_LATEST").read_text().strip()
    m = json.loads((out / "evaluation" / f"run={run}" / "metrics.json").read_text())
    return {
        "method": "pipeline default (lite1 center_crop rmac, neighbors.rerank=dba+alpha_qe n=10 alpha=3): "
        "cbir evaluate evaluate.mode=split",
        "p_at_10": round(m["precision_at_k"], 4),
        "map_at_10": round(m["map_at_k"], 4),
        "map": m["map"],
        "seconds": round(time.time() - t0, 1),
    }


# ----------------------------------------------------------------------------- dedup

OLD_TRANSFORMS = ("crop", "flip", "rotate", "rescale", "jpeg_q20", "brighten", "overlay_text")


def _edit_kinds() -> tuple[str, ...]:
    from cbir_lib.edits import KINDS

    return KINDS


TRANSFORMS = OLD_TRANSFORMS + _edit_kinds()
DEDUP_SET = CACHE / "dedup-set-v2" / "images"
DEDUP_OUT = CACHE / "dedup-out-v2"


def dedup_set(n_originals: int = 300, seed: int = 0, reuse: bool = False) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Originals + their copies + distractors under one folder; path -> (group, transform).

    Each original gets the 7 fixed edits of the demo sample (cbir_lib.sample) and the 7
    copy-detection edits of cbir_lib.edits, whose strengths are drawn per copy."""
    from PIL import Image

    from cbir_lib import edits
    from cbir_lib.sample import _transform

    d = DEDUP_SET
    files = paths()
    rng = random.Random(seed)
    train = [p for p in files if "/train/" in p]
    originals = set(rng.sample(train, n_originals))
    truth: dict[str, tuple[str, str]] = {}
    if reuse and d.exists():
        for i, p in enumerate(files):
            if p in originals:
                for kind in ("original", *TRANSFORMS):
                    truth[str(d / "dup" / f"g{i:04d}__{kind}.jpg")] = (f"g{i:04d}", kind)
        return d, truth
    if d.exists():
        shutil.rmtree(d)
    (d / "dup").mkdir(parents=True)
    (d / "other").mkdir(parents=True)
    for i, p in enumerate(files):
        if p in originals:
            with Image.open(p) as img:
                img.load()
                for kind in ("original", *TRANSFORMS):
                    name = d / "dup" / f"g{i:04d}__{kind}.jpg"
                    if kind == "original":
                        shutil.copyfile(p, name)
                    elif kind in OLD_TRANSFORMS:
                        name.write_bytes(_transform(img, kind))
                    else:
                        name.write_bytes(edits.edit(img, kind, random.Random(f"{seed}:{i}:{kind}")))
                    truth[str(name)] = (f"g{i:04d}", kind)
        else:
            shutil.copyfile(p, d / "other" / f"d{i:04d}.jpg")
    return d, truth


def _norm(p: str) -> str:
    return p[len("file:") :] if p.startswith("file:") else p


def clusters_of(edges: list[tuple[int, int]], paths_: list[str]) -> dict[int, list[str]]:
    """Connected components of ``edges`` (positions in ``paths_``): groups of two or more paths."""
    from cbir_lib.dedup.core import components

    lab = components(len(paths_), np.array(edges, np.int64).reshape(-1, 2))
    groups: dict[int, list[str]] = {}
    for j, c in enumerate(lab):
        groups.setdefault(int(c), []).append(paths_[j])
    return {c: m for c, m in groups.items() if len(m) > 1}


def pair_metrics(clusters: dict[int, list[str]], truth: dict[str, tuple[str, str]]) -> dict:
    """Pair precision/recall of the pairs a clustering implies (every two members of a
    cluster), counted without listing them: a 5,000-image cluster implies 12.5M pairs."""
    from collections import Counter

    cluster_of = {p: c for c, members in clusters.items() for p in members}
    found = sum(len(m) * (len(m) - 1) // 2 for m in clusters.values())
    by_group = Counter(g for g, _ in truth.values())
    true = sum(n * (n - 1) // 2 for n in by_group.values())
    together = Counter((cluster_of[p], g) for p, (g, _) in truth.items() if p in cluster_of)
    tp = sum(n * (n - 1) // 2 for n in together.values())
    per = {}
    for kind in TRANSFORMS:
        copies = [p for p, (_, t) in truth.items() if t == kind]
        hit = sum(1 for p in copies if p in cluster_of and cluster_of[p] == cluster_of.get(p.replace(f"__{kind}", "__original")))
        per[kind] = {"recall_vs_original": round(hit / max(1, len(copies)), 4)}
    return {
        "pair_precision": round(tp / max(1, found), 4),
        "pair_recall": round(tp / max(1, true), 4),
        "pairs_found": found,
        "pairs_true": true,
        "false_pairs": found - tp,
        "per_transform": per,
    }


def _tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``root`` and every descendant now alive, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(f[1])
        cpu[int(d)] = (int(f[11]) + int(f[12])) / tick
    keep, frontier = {root}, [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier and p not in keep]
        keep.update(frontier)
    return {p: cpu[p] for p in keep if p in cpu}


def _job(args: list[str], out: Path) -> dict:
    """One cbir job as a subprocess: wall seconds, and the CPU seconds (user + system) of its
    whole process tree (the driver, its JVM and the Python workers), sampled from /proc
    every 0.2 s (a process's last 0.2 s before it exits may be missed)."""
    import threading

    t0 = time.time()
    proc = subprocess.Popen([*CBIR, *args, "--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for p, c in _tree_cpu(proc.pid).items():
                seen[p] = max(seen.get(p, 0.0), c)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    stop.set()
    thread.join()
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(sum(seen.values()), 2)}


def _extract_again(out: Path, n: int, recorded: dict) -> dict:
    """Extract's cost measured now on the cached images table (in a scratch output root, so
    the cached embeddings the dedup runs read stay as they are)."""
    scratch = CACHE / "dedup-extract-again"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copytree(out / "images", scratch / "images")
    job = _job(["extract"], scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    print("extract (again, this run)", job, flush=True)
    return {
        **job,
        "images": n,
        "cpu_s_per_image": round(job["cpu_s"] / n, 5),
        "measured": "in this run",
        "recorded_before": recorded.get("cpu_s_per_image"),
    }


def _cost_scaling(d: Path, n: int, extract_cpu_s: float, dedup_cpu_s: float, frac: float = 0.25) -> dict:
    """Each job's cost as ``fixed + marginal x images``, from this run's full set and a
    quarter of it (the first quarter of the groups, every copy of each, and of the
    distractors: the same mix), run through the whole pipeline; and the ratio that gives
    at larger collections. The fixed part is the JVM's start, query planning and JIT, and
    per-run Spark work; the marginal part is what a cluster pays per image."""
    sub, sub_out = CACHE / "dedup-quarter-set", CACHE / "dedup-quarter-out"
    for p in (sub, sub_out):
        shutil.rmtree(p, ignore_errors=True)
    groups = sorted({p.name.split("__")[0] for p in (d / "dup").iterdir()})
    keep = set(groups[: round(len(groups) * frac)])
    others = sorted((d / "other").iterdir())
    for folder, files in (
        ("dup", [p for p in (d / "dup").iterdir() if p.name.split("__")[0] in keep]),
        ("other", others[: round(len(others) * frac)]),
    ):
        (sub / folder).mkdir(parents=True)
        for p in files:
            shutil.copyfile(p, sub / folder / p.name)
    m = sum(1 for _ in sub.rglob("*.jpg"))
    small = {}
    for name, args in (
        ("ingest", ["ingest", "--images", str(sub)]),
        ("extract", ["extract"]),
        ("build_index", ["build_index"]),
        ("neighbors", ["neighbors"]),
        ("dedup", ["dedup"]),
    ):
        small[name] = _job(args, sub_out)
    print("quarter set", m, small, flush=True)
    fit = {}
    for job, full in (("extract", extract_cpu_s), ("dedup", dedup_cpu_s)):
        marginal = (full - small[job]["cpu_s"]) / (n - m)
        fit[job] = {
            "images": [m, n],
            "cpu_s": [small[job]["cpu_s"], full],
            "marginal_ms_per_image": round(1000 * marginal, 2),
            "fixed_s": round(full - marginal * n, 1),
        }

    def ratio(images: int) -> float:
        return round(
            (fit["dedup"]["fixed_s"] + fit["dedup"]["marginal_ms_per_image"] / 1000 * images)
            / (fit["extract"]["fixed_s"] + fit["extract"]["marginal_ms_per_image"] / 1000 * images),
            3,
        )

    return {
        "rule": "cpu_s = fixed + marginal x images, fitted through two sizes of the same mix measured in this run; "
        "the ratios past the measured sizes are projections of that line",
        **fit,
        "marginal_ratio": round(fit["dedup"]["marginal_ms_per_image"] / fit["extract"]["marginal_ms_per_image"], 3),
        "measured_ratio": {
            str(m): round(small["dedup"]["cpu_s"] / small["extract"]["cpu_s"], 3),
            str(n): round(dedup_cpu_s / extract_cpu_s, 3),
        },
        "projected_ratio": {str(k): ratio(k) for k in (100_000, 1_000_000)},
        "caveat": "per-image work assumed constant: the band is bounded per image and the candidates come from k neighbours, but the "
        "dihedral multi-index (dedup.dihedral_chunks 3: 21-22-bit keys, radius 2) compares each probe with the stored "
        "hashes under its key: 84 per image at 7,981 images, growing with N (projected 10.6k at 1M, 1.06M at 100M)",
    }


def dedup() -> dict:
    import pyarrow.parquet as pq

    reuse = "--reuse" in sys.argv
    d, truth = dedup_set(reuse=reuse)
    out = DEDUP_OUT
    t0 = time.time()
    jobs: dict[str, dict] = {}
    if not (reuse and (out / "neighbors" / "_LATEST").exists()):
        shutil.rmtree(out, ignore_errors=True)
        for name, args in (
            ("ingest", ["ingest", "--images", str(d)]),
            ("extract", ["extract"]),
            ("build_index", ["build_index"]),
            ("neighbors", ["neighbors"]),
        ):
            jobs[name] = _job(args, out)
            print(name, jobs[name], flush=True)
    pipeline_s = time.time() - t0
    img_run = (out / "images" / "_LATEST").read_text().strip()
    imgs = pq.read_table(out / "images" / f"run={img_run}", columns=["image_id", "path", "status"]).to_pylist()
    path_of = {r["image_id"]: _norm(r["path"]) for r in imgs if r["status"] == "ok"}
    ids = sorted(path_of)
    pos = {i: j for j, i in enumerate(ids)}
    paths_ = [path_of[i] for i in ids]
    t_truth = {_norm(p): v for p, v in truth.items()}
    emb_manifest = _latest(out, "embeddings")
    reused = "extract" not in jobs
    if reused:  # --reuse: the recorded figures of the run that made the embeddings (measured again below)
        jobs["extract"] = (
            (json.loads(RESULTS.read_text()).get("dedup", {}).get("cost", {}).get("extract") or {}) if RESULTS.exists() else {}
        )
    extract_cost = {**jobs["extract"], "images": len(ids), "wall_x_cores_s": round(emb_manifest["wall_seconds"] * (os.cpu_count() or 1), 2)}
    extract_cost["cpu_s_per_image"] = round(extract_cost["cpu_s"] / len(ids), 5) if extract_cost.get("cpu_s") else None

    def run(run_id: str, *settings: str) -> dict:
        job = _job(["dedup", "--run-id", run_id, "run.keep_snapshots=50", *settings], out)
        manifest = json.loads((out / "dedup" / f"run={run_id}" / "_manifest.json").read_text())
        cl = pq.read_table(out / "dedup" / f"run={run_id}" / "clusters", columns=["cluster_id", "path"]).to_pylist()
        clusters: dict[int, list[str]] = {}
        for r in cl:
            clusters.setdefault(r["cluster_id"], []).append(_norm(r["path"]))
        m = pair_metrics(clusters, t_truth)
        # The edges that join two groups (or a group and a distractor), with their evidence:
        # some are the source set's own duplicates (clothing-small holds a few photos twice,
        # or two shots of one garment seconds apart), the rest are the method's errors.
        group = {p: g for p, (g, _) in t_truth.items()}
        name = {i: Path(p).name for i, p in zip(ids, paths_, strict=True)}
        edges = pq.read_table(out / "dedup" / f"run={run_id}" / "pairs").to_pylist()
        m["false_edges"] = [
            {
                "a": name[e["a"]],
                "b": name[e["b"]],
                **{k: e.get(k) for k in ("source", "decision", "hamming", "score", "inliers", "agreement")},
            }
            for e in edges
            if group.get(path_of[e["a"]], path_of[e["a"]]) != group.get(path_of[e["b"]], path_of[e["b"]])
        ]
        cost = {
            **job,
            "cpu_s_per_image": round(job["cpu_s"] / len(ids), 5),
            "wall_x_cores_per_image_s": manifest["cost"]["core_seconds_per_image"],
        }
        row = {
            "settings": list(settings) or ["(the shipped defaults)"],
            **m,
            "cost": cost,
            "timings": manifest["timings"],
            "counts": {k: manifest["counts"].get(k) for k in ("candidates", "pairs", "band", "verified", "signed", "not_verified")},
        }
        print(run_id, settings, m["pair_precision"], m["pair_recall"], len(m["false_edges"]), "false edges", cost, flush=True)
        return row

    # The loose candidates once (the rules alone, verify=off), swept offline below.
    loose = [
        "dedup.verify=off",
        "dedup.hash=any",
        "dedup.phash_threshold=16",
        "dedup.ahash_threshold=16",
        "dedup.dhash_threshold=16",
        "dedup.phash_chunks=8",
        "dedup.min_score=0.7",
    ]
    if not (reuse and (out / "dedup" / "run=loose").exists()):
        _job(["dedup", *loose, "--run-id", "loose", "run.keep_snapshots=50"], out)
    pairs = pq.read_table(out / "dedup" / "run=loose" / "pairs").to_pylist()

    def clusters_for(t: int | None, tau: float | None, hashes: dict[str, int] | None = None) -> dict[int, list[str]]:
        limits = hashes if hashes is not None else ({"phash": t} if t is not None else {})
        keep = [
            (pos[p["a"]], pos[p["b"]])
            for p in pairs
            if p["source"] == "exact"
            or (p["source"] in limits and p["hamming"] <= limits[p["source"]])
            or (tau is not None and p["source"] == "embedding" and p["score"] >= tau)
        ]
        return clusters_of(keep, paths_)

    # dedup.hash: each perceptual hash alone, swept; its threshold is the loosest at pair
    # precision >= 0.99; "any" is the union of the three at those thresholds.
    hashes, chosen_t = [], {}
    for h in ("phash", "ahash", "dhash"):
        rows_h = []
        for t in (0, 1, 2, 4, 6, 8, 10, 12):
            m = pair_metrics(clusters_for(None, None, {h: t}), t_truth)
            rows_h.append({"hash": h, "threshold": t, **m})
        ok_h = [r for r in rows_h if r["pair_precision"] >= 0.99]
        # none at 0.99: the most precise threshold (the loosest of equals), reported as such
        chosen_t[h] = (
            max(ok_h, key=lambda r: r["pair_recall"]) if ok_h else max(rows_h, key=lambda r: (r["pair_precision"], r["threshold"]))
        )["threshold"]
        hashes.extend(rows_h)
        print("hash", h, [(r["threshold"], r["pair_precision"], r["pair_recall"]) for r in rows_h], flush=True)
    any_m = pair_metrics(clusters_for(None, None, chosen_t), t_truth)
    hashes.append({"hash": "any", "threshold": dict(chosen_t), **any_m})

    # The rules alone (verify=off, the default before verify=band), swept on the loose pairs.
    sweep = []
    for t in (None, 4, 6, 8, 10, 12, 14, 16):
        for tau in (None, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95):
            if t is None and tau is None:
                continue
            m = pair_metrics(clusters_for(t, tau), t_truth)
            sweep.append({"phash_threshold": t, "min_score": tau, "pair_precision": m["pair_precision"], "pair_recall": m["pair_recall"]})
    ok = [s for s in sweep if s["pair_precision"] >= 0.99]
    best = max(ok, key=lambda s: (s["pair_recall"], s["pair_precision"])) if ok else max(sweep, key=lambda s: s["pair_precision"])
    print("rules chosen", best, flush=True)
    rules_args = [
        "dedup.verify=off",
        "dedup.sources="
        + (
            "both"
            if best["phash_threshold"] is not None and best["min_score"] is not None
            else ("phash" if best["min_score"] is None else "embedding")
        ),
    ]
    if best["phash_threshold"] is not None:
        rules_args.append(f"dedup.phash_threshold={best['phash_threshold']}")
    if best["min_score"] is not None:
        rules_args.append(f"dedup.min_score={best['min_score']}")
    rules = run("rules", *rules_args)

    # The shipped default (verify=band), the exhaustive mode, and the variants tried.
    default = run("default")
    previous = json.loads(RESULTS.read_text()).get("dedup", {}) if RESULTS.exists() else {}
    if "--default-only" in sys.argv and previous.get("verified") and previous.get("variants"):
        # the exhaustive mode and the variants as an earlier run of this session measured them
        note = "recorded by an earlier run (this one had --default-only); its settings are the defaults then plus the row's own"
        exhaustive = {**previous["verified"], "note": previous["verified"].get("note") or note}
        variants = [{**v, "note": v.get("note") or note} for v in previous["variants"]]
    else:
        exhaustive = run("all", "dedup.verify=all")
        variants = [
            run(f"v{j}", *v)
            for j, v in enumerate(
                (["dedup.band_per_image=6"], ["dedup.band_per_image=6", "dedup.verify_max_side=512", "dedup.max_diameter=6"])
            )
        ]
    n = len(ids)
    if reused:  # extract again here, so that both costs come from this run, on the same cores
        extract_cost = _extract_again(out, n, extract_cost)
        jobs["extract"] = {k: extract_cost[k] for k in ("wall_s", "cpu_s")}
    scaling = _cost_scaling(d, n, extract_cost["cpu_s"], default["cost"]["cpu_s"])
    worst = min(default["per_transform"].items(), key=lambda kv: kv[1]["recall_vs_original"])
    return {
        **{k: default[k] for k in ("pair_precision", "pair_recall", "pairs_found", "pairs_true", "false_pairs", "per_transform")},
        "cost_per_image_s": default["cost"]["cpu_s_per_image"],
        "extract_cost_per_image_s": extract_cost["cpu_s_per_image"],
        "cost": {
            "rule": "CPU seconds (user + system) of the job's whole process tree, per ok image, on the same photos and cores in one run; "
            "wall_x_cores is the stage's wall time on all its cores (an upper bound)",
            "dedup": default["cost"],
            "extract": extract_cost,
            "pipeline_jobs": jobs,
            "scaling": scaling,
        },
        "cost_runs": previous.get("cost_runs"),
        "targets": {
            "pair_recall>=0.95": default["pair_recall"] >= 0.95,
            "pair_precision>=0.99": default["pair_precision"] >= 0.99,
            "every_transform>=0.85": worst[1]["recall_vs_original"] >= 0.85,
            "worst_transform": [worst[0], worst[1]["recall_vs_original"]],
            "cost<=extract": bool(extract_cost["cpu_s_per_image"])
            and default["cost"]["cpu_s_per_image"] <= extract_cost["cpu_s_per_image"],
        },
        "default": default,
        "verified": exhaustive,
        "rules": rules,
        "variants": variants,
        "chosen": best,
        "images": n,
        "groups": len({g for g, _ in truth.values()}),
        "transforms": list(TRANSFORMS),
        "distractors": n - len(truth),
        "pipeline_seconds": round(pipeline_s, 1),
        "dedup_job_seconds": default["cost"]["wall_s"],
        "sweep": sweep,
        "hashes": {
            "rows": hashes,
            "chosen_thresholds": chosen_t,
            "rule": "each hash alone (exact pairs included); threshold: the loosest with pair precision >= 0.99, else the most precise",
        },
        "per_source_alone": {
            "phash_only_t10": pair_metrics(clusters_for(10, None), t_truth),
            "embedding_only_best": pair_metrics(clusters_for(None, best["min_score"] or 0.9), t_truth),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--retrieval", action="store_true")
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--dedup", action="store_true")
    ap.add_argument("--backbones", action="store_true", help="backbone x pooling x re-ranking grid, k-reciprocal sweep")
    ap.add_argument("--seeds", action="store_true", help="the seeds' methods through the pipeline (colour histogram)")
    ap.add_argument("--pwa", action="store_true", help="PWA pooling's parts x whitening x re-ranking grid on cached feature maps")
    ap.add_argument("--other", action="store_true", help="each backbone on another kind of photo (the demo sample)")
    ap.add_argument("--stages", action="store_true", help="each backbone through the pipeline: extract img/s, neighbours s")
    ap.add_argument("--reuse", action="store_true", help="dedup: reuse the generated set and pipeline outputs in .cache")
    ap.add_argument(
        "--default-only", action="store_true", help="dedup: run the default and the rules; keep the recorded verify=all and variants"
    )
    a = ap.parse_args()
    everything = not (a.retrieval or a.pipeline or a.dedup or a.backbones or a.stages or a.other or a.seeds or a.pwa)
    if not CLOTHING.exists():
        raise SystemExit(f"{CLOTHING} is absent")
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res["machine"] = f"{os.cpu_count()} cores"
    if everything or a.retrieval:
        rows = retrieval()
        res["retrieval"] = rows
        base = next(r for r in rows if r["method"] == "lite0 squash gap rerank=none")
        best = max(rows, key=lambda r: r["p_at_10"])
        res["baseline"] = base["method"]
        res["best"] = best["method"]
        print(f"P@10 best / baseline = {best['p_at_10']} / {base['p_at_10']} = {best['p_at_10'] / base['p_at_10']:.3f}x")
    if everything or a.backbones:
        res["backbones"] = backbone_grid()
        res["kr_sweep"] = kr_sweep("lite0") + kr_sweep("lite2")
        _save(res)
    if everything or a.seeds:
        res["seed_methods"] = seed_methods()
        _save(res)
    if everything or a.pwa:
        res["pwa"] = pwa_grid("lite1")
        _save(res)
    if everything or a.other:
        res["other_photos"] = other_photos()
        _save(res)
    if everything or a.stages:
        res["stages"] = stages()
        _save(res)
    if everything or a.pipeline:
        p = pipeline()
        res["retrieval"] = [r for r in res.get("retrieval", []) if not r["method"].startswith("pipeline")] + [p]
        print(p)
    res["default"] = "lite1 center_crop rmac rerank=dba+alpha_qe"
    if everything or a.dedup:
        res["dedup"] = dedup()
        print({k: v for k, v in res["dedup"].items() if k != "sweep"})
    _save(res)


def _save(res: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
