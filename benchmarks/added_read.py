"""The incremental index's read of a night's added rows (``_read_added``) at 500k x 1,280.

A night of 5,000 new and 1,000 changed rows, written as extract writes embeddings:

- *mixed*: the night's rows among the others' files (extract before 2026-12-07);
- *fresh*: in files of their own (extract since, ``fresh_rows``).

Each layout is read by ``_read_added`` with each file read whole, as before (its row groups
with an added row then decoded) and opened for ranged reads, as after (a row group without
one costs its ids).
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
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def whole_file(files, uri: str):
    """What ``_read_added`` opened before 7fc316e: the file read whole into memory (its loop
    over the row groups is the same)."""
    import pyarrow.parquet as pq

    from cbir_lib.common import remote

    data, err = remote.read(files, uri)
    if data is None:
        raise OSError(err)
    return pq.ParquetFile(io.BytesIO(data))


def main() -> None:
    import pyarrow as pa
    from all_pairs import write_embeddings

    from cbir_lib.common import remote
    from cbir_lib.index.incremental import _read_added

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
            for name, opener in (("whole", whole_file), ("ranged", remote.open_parquet)):
                best = float("inf")
                with mock.patch.object(remote, "open_parquet", opener):
                    for _ in range(3):
                        t = time.perf_counter()
                        got = sum(b.num_rows for b in _read_added(remote.Files(), added, added, lambda bs: bs)(iter(batch)))
                        best = min(best, time.perf_counter() - t)
                assert got == added.size, got
                out[f"{layout}_{name}_s"] = round(best, 2)
        finally:
            shutil.rmtree(root)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
