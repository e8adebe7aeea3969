"""The incremental index's read of a night's added rows (``_read_added``) at 500k x 1,280.

A night of 5,000 new and 1,000 changed rows, written as extract writes embeddings:

- *mixed*: the night's rows among the others' files (extract before 2026-12-07);
- *fresh*: in files of their own (extract since, ``fresh_rows``).

Each layout is read by the code before (every file read whole, then its row groups with
an added row decoded) and after (ranged reads: a row group without one costs its ids).
Best of 3 per cell, on one thread, the files in the page cache.

Run: ``python benchmarks/added_read.py`` (needs ``benchmarks/.cache/mixture_550000_1280.npy``,
made by ``incremental.py --dim 1280``). Prints one JSON line; the results are recorded by
hand under ``core_checks`` in ``results/incremental.json``.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def whole(files, ids, fps, assigner):
    """``_read_added`` as it was at 82cd571: each file read whole into memory."""
    from cbir_lib.common import remote

    def fn(batches):
        import pyarrow as pa
        import pyarrow.parquet as pq

        def picked():
            for b in batches:
                for uri in b.column("uri").to_pylist():
                    data, _ = remote.read(files, uri)
                    pf = pq.ParquetFile(io.BytesIO(data))
                    for g in range(pf.num_row_groups):
                        key = pf.read_row_group(g, columns=["image_id"]).column(0).to_numpy()
                        at = np.minimum(np.searchsorted(ids, key), len(ids) - 1)
                        hit = ids[at] == key
                        if not hit.any():
                            continue
                        t = pf.read_row_group(g, columns=["image_id", "embedding"]).filter(pa.array(hit))
                        t = t.append_column("fp", pa.array(fps[at[hit]]))
                        yield from t.combine_chunks().to_batches()

        yield from assigner(picked())

    return fn


def main() -> None:
    import pyarrow as pa
    from all_pairs import write_embeddings

    from cbir_lib.common import remote
    from cbir_lib.index.incremental import _read_added as ranged

    x = np.load(ROOT / "benchmarks" / ".cache" / "mixture_550000_1280.npy", mmap_mode="r")[:500_000]
    n = len(x)
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(1)
    fresh = np.zeros(n, bool)
    fresh[-5000:] = True  # new
    fresh[rng.choice(n - 5000, 1000, replace=False)] = True  # changed
    added = np.sort(ids[fresh])
    out = {}
    for layout in ("mixed", "fresh"):
        root = Path(tempfile.mkdtemp(prefix=f"added-read-{layout}-"))
        try:
            write_embeddings(root, ids, x, "e", sha=[str(i) for i in range(n)], fresh=None if layout == "mixed" else fresh)
            uris = sorted("file://" + str(p) for p in (root / "embeddings" / "run=e").glob("*.parquet"))
            batch = [pa.RecordBatch.from_arrays([pa.array(uris)], names=["uri"])]
            for name, read in (("whole", whole), ("ranged", ranged)):
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    got = sum(b.num_rows for b in read(remote.Files(), added, added, lambda bs: bs)(iter(batch)))
                    best = min(best, time.perf_counter() - t)
                assert got == added.size, got
                out[f"{layout}_{name}_s"] = round(best, 2)
        finally:
            shutil.rmtree(root)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
