"""What dedup costs a night: the copy signatures of every image, or of the change only.

    python benchmarks/dedup_nights.py [--label L] [--share 0.01] [--set clothing|copies]

On real photos (``--set``: see :func:`_images_table`; the images table cached, or
ingested here), three ``cbir dedup`` runs, each a spark-submit
with its JVM, one after the other on the same cores:

1. ``base``: the collection less a held-out share (by image id), into an empty dedup table;
2. ``night``: the whole collection, the share new (a night that adds ``--share``);
3. ``rerun``: the same images again under another run id (a retried or repeated night).

Each row records the run's wall time, its ``signatures_s`` (reading, decoding and
signing the images: ~11 ms of a core each at the defaults), ``verify_s`` (the band's
pairs, ~3 ms each) and ``pairs_s`` (the candidates: untouched by the caches, and the
noisiest step here: the same dihedral multi-index took 4-27 s on the same 3,781 images),
and, where the manifest says, what each cache computed and took from earlier runs. The ratios are
against the ``base`` run of the same invocation. ``dedup.sources=phash``: the embedding
pairs need a neighbours table, and are not what a night's signatures cost. Results go
to ``benchmarks/results/dedup_nights.json`` under ``--label``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
CLOTHING = ROOT.parent / "shared" / "data" / "clothing-small"
RESULTS = ROOT / "benchmarks" / "results" / "dedup_nights.json"
CBIR = [sys.executable, "-m", "jobs.cli"]


def _images_table(which: str) -> Path:
    """The images table of ``clothing`` (clothing-small's photos: few copies) or ``copies``
    (quality.py's dedup set: 300 photos with 14 edited copies each among 3,481 others, so
    most images have pairs to verify): the cached one, or ingested into the cache."""
    if which == "clothing":
        cached, photos = CACHE / "clothing-run" / "images", CLOTHING
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import quality

        cached, photos = CACHE / "dedup-set-v2" / "run" / "images", quality.DEDUP_SET
        if not (cached / "_LATEST").exists() and not photos.exists():
            quality.dedup_set()
    if not (cached / "_LATEST").exists():
        if not CLOTHING.exists():
            raise SystemExit(f"{CLOTHING} is absent: the benchmark reads its photos")
        subprocess.run([*CBIR, "ingest", "--images", str(photos), "--output", str(cached.parent)], cwd=ROOT, check=True)
    return cached


def _write_snapshot(src: Path, dst_table: Path, run_id: str, keep) -> None:
    """A snapshot ``run_id`` of the images table ``src`` holding the rows ``keep(ids)`` selects."""
    import pyarrow.parquet as pq

    run = (src / "_LATEST").read_text().strip()
    src_dir = src / f"run={run}"
    t = pq.read_table(sorted(src_dir.glob("*.parquet")))
    t = t.filter(keep(t.column("image_id").to_numpy()))
    out = dst_table / f"run={run_id}"
    out.mkdir(parents=True)
    pq.write_table(t, out / "part-00000.parquet")
    manifest = json.loads((src_dir / "_manifest.json").read_text())
    manifest.update(run_id=run_id, commit_id=uuid.uuid4().hex)
    (out / "_manifest.json").write_text(json.dumps(manifest))
    (out / "_SUCCESS").write_text("")


def _run(root: Path, run_id: str) -> dict:
    t0 = time.time()
    subprocess.run(
        [*CBIR, "dedup", "--output", str(root), "dedup.sources=phash", f"run.run_id={run_id}", "run.keep_snapshots=5"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    wall = time.time() - t0
    m = json.loads((root / "dedup" / f"run={run_id}" / "_manifest.json").read_text())
    c = m["counts"]
    return {
        "run_id": run_id,
        "submit_s": round(wall, 1),
        "wall_seconds": m["wall_seconds"],
        "signatures_s": m["timings"].get("signatures_s"),
        "verify_s": m["timings"].get("verify_s"),
        "pairs_s": m["timings"].get("pairs_s"),
        "ok": c["ok"],
        "signed": c.get("signed"),
        "signatures": m.get("signatures"),
        "verdicts": m.get("verdicts"),
        "band": c.get("band"),
        "clusters": c["clusters"],
        "images_in_clusters": c["images_in_clusters"],
        "pairs": c["pairs"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="run")
    ap.add_argument("--share", type=float, default=0.01, help="the share of the photos the night adds")
    ap.add_argument("--set", default="clothing", choices=("clothing", "copies"), help="which photos (see _images_table)")
    args = ap.parse_args(argv)
    import numpy as np

    src = _images_table(args.set)
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    try:
        images = root / "images"
        cut = np.uint64(int(args.share * 2**64))

        def held_out(ids):
            return (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) < cut  # a fixed share, by id

        _write_snapshot(src, images, "base", lambda ids: ~held_out(ids))
        (images / "_LATEST").write_text("base")
        rows = [{"run": "base", **_run(root, "r1")}]
        print(rows[-1], flush=True)
        _write_snapshot(src, images, "night", lambda ids: np.ones(ids.size, bool))
        (images / "_LATEST").write_text("night")
        rows.append({"run": "night", **_run(root, "r2")})
        print(rows[-1], flush=True)
        rows.append({"run": "rerun", **_run(root, "r3")})
        print(rows[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]
    for r in rows:
        r["wall_ratio"] = round(r["wall_seconds"] / base["wall_seconds"], 3)
        for part in ("signatures_s", "verify_s"):
            if r[part] is not None and base[part]:
                r[part.replace("_s", "_ratio")] = round(r[part] / base[part], 3)
    record = {
        "label": args.label,
        "code": code,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "set": args.set,
        "share_added": args.share,
        "runs": rows,
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    results["runs"][args.label] = record
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({r["run"]: (r["wall_seconds"], r["signatures_s"], r["verify_s"], r["pairs_s"]) for r in rows}))


if __name__ == "__main__":
    main()
