"""How many of the exact (old, new) pairs a night's reverse updates reach, on many pairs.

    python benchmarks/reverse_reach.py OUTPUT_ROOT [OLD_QUERIES] [RUN]

OUTPUT_ROOT holds an incremental night's index and neighbours (``benchmarks/incremental.py
--keep`` leaves one; angular metric). Of a sample of old images (5,000 by default), the
exact top-10 over the night's collection gives the pairs (old image, new image in it); the
report says how many of them the night's committed list holds (the reverse recall), the
lists' own recall@10 on the same images, and, for the route's widths, how many pairs the
new image's cells reach: the old image's cell among its first W cells by centroid score,
or its own. The benchmark's own reverse recall rests on the ~50 pairs of its 500 old
images; this one on ~600.
"""

import glob
import json
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from cbir_lib.neighbors.tasks import read_store_parts
from cbir_lib.vectors.topk import exact_topk, recall_at_k

W = sys.argv[1]
RUN = sys.argv[3] if len(sys.argv) > 3 else open(f"{W}/neighbors/_LATEST").read().strip()
parts = sorted(glob.glob(f"{W}/index/run={RUN}/store/*.parquet"))
cells, ids, x, *_ = read_store_parts(["file://" + p for p in parts])
x = np.ascontiguousarray(x, np.float32)
delta = pq.read_table(f"{W}/index/run={RUN}/delta").to_pandas()
added = np.sort(delta[delta.kind == "added"].image_id.to_numpy())
old_ids = np.setdiff1d(ids, added)
m = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
rng = np.random.default_rng(7)
q_ids = np.sort(rng.choice(old_ids, m, replace=False))
order = np.argsort(ids)
qpos = order[np.searchsorted(ids[order], q_ids)]
assert (ids[qpos] == q_ids).all()
t = time.time()
tv, ti = exact_topk(x[qpos], q_ids, x, ids, 10, "angular")
print("exact", round(time.time() - t, 1), "s", file=sys.stderr)
nb = pq.read_table(f"{W}/neighbors/run={RUN}", columns=["image_id", "rank", "neighbor_id", "score"]).to_pandas()
nb = nb[nb.image_id.isin(q_ids)]
held = set(zip(nb.image_id.to_numpy().tolist(), nb.neighbor_id.to_numpy().tolist(), strict=True))
is_new = np.isin(ti, added)
rows, cols = np.nonzero(is_new)
pairs = [(int(q_ids[r]), int(ti[r, c])) for r, c in zip(rows, cols, strict=True)]
got = sum(p in held for p in pairs)
# the lists' recall on the same queries (recall@10 against exact)
lists = nb.sort_values(["image_id", "rank"])
gi = np.full((m, 10), -1, np.int64)
gv = np.full((m, 10), -np.inf, np.float32)
at = np.searchsorted(q_ids, lists.image_id.to_numpy())
rk = lists["rank"].to_numpy() - 1
gi[at, rk] = lists.neighbor_id.to_numpy()
gv[at, rk] = lists.score.to_numpy()
print(
    json.dumps(
        {
            "old_queries": m,
            "exact_new_pairs": len(pairs),
            "held": got,
            "reverse_recall": round(got / max(1, len(pairs)), 4),
            "recall_old": round(float(recall_at_k(gi, ti, tv, gv)), 4),
            "nprobe": json.load(open(f"{W}/neighbors/run={RUN}/_manifest.json")).get("nprobe"),
        }
    )
)

# Where the misses are: the rank of the old image's cell among the new image's cells by
# centroid score (the route's order), for every exact pair.
cent = np.load(f"{W}/index/run={RUN}/centroids.npy").astype(np.float32)
cell_of = dict(zip(ids.tolist(), cells.tolist(), strict=True))
newpos = order[np.searchsorted(ids[order], np.array([p[1] for p in pairs]))]
qv = x[newpos]
sc = qv @ cent.T
own = np.array([cell_of[p[1]] for p in pairs])
xc = np.array([cell_of[p[0]] for p in pairs])
rank = (sc > sc[np.arange(len(pairs)), xc][:, None]).sum(axis=1)
hit = np.array([p in held for p in pairs])
out = {}
for w in (36, 45, 54, 63, 72, 90):
    reach = (rank < w) | (xc == own)
    out[w] = round(float(reach.mean()), 4)
print(
    json.dumps(
        {
            "pairs_reached_by_cells": out,
            "held_but_not_reached_at_45": int((hit & ~((rank < 45) | (xc == own))).sum()),
            "reached_at_45_not_held": int((~hit & ((rank < 45) | (xc == own))).sum()),
        }
    )
)
