"""How many of the exact (old, new) pairs a night's reverse updates reach, on many pairs.

    python benchmarks/reverse_reach.py OUTPUT_ROOT [OLD_QUERIES] [RUN]

OUTPUT_ROOT holds an incremental night's index and neighbours (``benchmarks/incremental.py
--keep`` leaves one; angular metric). Of a sample of old images (5,000 by default), the
exact top-10 over the night's collection gives the pairs (old image, new image in it); the
report says how many of them the night's committed list holds (the reverse recall), the
lists' own recall@10 on the same images, and, for the route's widths, how many pairs the
new image's cells reach: the old image's cell among its first W cells by centroid score,
or its own. It checks the pairs held against those the night's width reaches
(``REVERSE_PROBES`` x its ``nprobe``: the night must have run at the current setting).
The benchmark's own reverse recall rests on the ~50 pairs of its 500 old images; this
one on ~600.
"""

import glob
import json
import math
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cbir_lib.neighbors.lists import topk_arrays
from cbir_lib.neighbors.spec import REVERSE_PROBES
from cbir_lib.neighbors.tasks import positions_in, read_store_parts
from cbir_lib.vectors.topk import exact_topk, recall_at_k

W = sys.argv[1]
RUN = sys.argv[3] if len(sys.argv) > 3 else open(f"{W}/neighbors/_LATEST").read().strip()
if json.load(open(f"{W}/index/run={RUN}/_manifest.json")).get("store_layers"):
    sys.exit(f"index run {RUN} keeps its store in layers (cbir_lib/index/layers.py): replay the night with index.max_store_layers=0")
parts = sorted(glob.glob(f"{W}/index/run={RUN}/store/*.parquet"))
cells, ids, x, *_ = read_store_parts(["file://" + p for p in parts])
x = np.ascontiguousarray(x, np.float32)
delta = pq.read_table(f"{W}/index/run={RUN}/delta").to_pandas()
added = np.sort(delta[delta.kind == "added"].image_id.to_numpy())
old_ids = np.setdiff1d(ids, added)
m = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
rng = np.random.default_rng(7)
q_ids = np.sort(rng.choice(old_ids, m, replace=False))
qpos = positions_in(ids, q_ids)
assert (ids[qpos] == q_ids).all()
nprobe = json.load(open(f"{W}/neighbors/run={RUN}/_manifest.json")).get("nprobe")
t = time.time()
tv, ti = exact_topk(x[qpos], q_ids, x, ids, 10, "angular")
print("exact", round(time.time() - t, 1), "s", file=sys.stderr)
lists = pq.read_table(f"{W}/neighbors/run={RUN}", columns=["image_id", "rank", "neighbor_id", "score"])
lists = lists.filter(pc.is_in(lists.column("image_id"), value_set=pa.array(q_ids)))
gv, gi = topk_arrays(lists, q_ids, 10)  # the committed lists of the sample, as the exact top-k's arrays
rows, cols = np.nonzero(np.isin(ti, added))
pairs = [(int(q_ids[r]), int(ti[r, c])) for r, c in zip(rows, cols, strict=True)]
hit = (gi[rows] == ti[rows, cols][:, None]).any(axis=1)  # the old image's list holds the new one
got = int(hit.sum())
print(
    json.dumps(
        {
            "old_queries": m,
            "exact_new_pairs": len(pairs),
            "held": got,
            "reverse_recall": round(got / max(1, len(pairs)), 4),
            "recall_old": round(float(recall_at_k(gi, ti, tv, gv)), 4),
            "nprobe": nprobe,
        }
    )
)

# Where the misses are: the rank of the old image's cell among the new image's cells by
# centroid score (the route's order), for every exact pair.
cent = np.load(f"{W}/index/run={RUN}/centroids.npy").astype(np.float32)
new_pos = positions_in(ids, ti[rows, cols])
old_cell, own = cells[qpos[rows]], cells[new_pos]
sc = x[new_pos] @ cent.T
rank = (sc > sc[np.arange(len(pairs)), old_cell][:, None]).sum(axis=1)


def reached(w: int) -> np.ndarray:
    return (rank < w) | (old_cell == own)


width = math.ceil(REVERSE_PROBES * nprobe)
print(
    json.dumps(
        {
            # widths as session 33 read them at 1M x 256 (nprobe 36), and as multiples of this night's nprobe
            "pairs_reached_by_cells": {
                w: round(float(reached(w).mean()), 4)
                for w in sorted({36, 45, 54, 63, 72, 90} | {math.ceil(f * nprobe) for f in (1.0, 1.25, 1.5, 2.0)})
            },
            "width": width,
            "held_but_not_reached": int((hit & ~reached(width)).sum()),
            "reached_not_held": int((~hit & reached(width)).sum()),
        }
    )
)
