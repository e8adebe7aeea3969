"""How far one night's change spreads under each re-ranking mode: the work an incremental
night would have to redo, by exact search.

    python benchmarks/rerank_churn.py [--data fashion|real|mixture] [--n N] [--nights 1]

An incremental night (``neighbors.mode=incremental``) runs only with ``neighbors.rerank=none``;
with any other mode the neighbours are rebuilt in full each night, and the shipped default
is ``dba+alpha_qe``. This measures why, on real embeddings at the shipped defaults
(``all_pairs.py``'s Fashion-MNIST or clothing-small, made by this project's extract), on
nights of the issue's shape (``incremental.py``'s ``draw_night``: 1 % added, 30 % of them
near-copies, 0.2 % deleted, 0.2 % changed).

Each mode is run exactly, before and after the night, as :func:`cbir_lib.neighbors.rerank.exact_rerank`
defines it (``rerank_n`` 10, ``alpha`` 3, the defaults), with ties broken by id. The
re-ranked vectors are fixed-point sums (``rerank.augment``), so a vector that did not
change is equal bit for bit. Of the old images that stayed (not deleted, not changed):

- ``lists_changed``: the top-k (ids in rank order) differs; ``sets_changed``: as a set;
- ``database_changed`` (``dba``, ``dba+alpha_qe``): the augmented database vector
  differs: every list scored against it may move, so a night must rescore them;
- ``queries_changed`` (``alpha_qe``, ``dba+alpha_qe``): the expanded query differs: a
  night must search it again.

``none`` is what an incremental night updates today (its lists_changed are the reverse
updates and refills). For the others, ``must_redo`` is the share of old images a night
would have to search again or rescore (queries changed, or lists holding a changed database
vector), a lower bound on its work against a rebuild's 100 %. Results:
``benchmarks/results/rerank_churn.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results" / "rerank_churn.json"
K = 10
N_RERANK = 10  # neighbors.rerank_n
ALPHA = 3.0  # neighbors.alpha
MODES = ("none", "alpha_qe", "dba", "dba+alpha_qe")
QUERY_BLOCK = 2048


def topk(q: np.ndarray, q_ids: np.ndarray, g: np.ndarray, g_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of every row of ``q`` over ``g`` by inner product, its own id excluded,
    ties by id: ``(scores, ids)``."""
    from cbir_lib.vectors.topk import exact_topk

    vals, ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    for s in range(0, len(q), QUERY_BLOCK):
        e = min(len(q), s + QUERY_BLOCK)
        vals[s:e], ids[s:e] = exact_topk(q[s:e], q_ids[s:e], g, g_ids, k, "dot")
    return vals, ids


def modes(ids: np.ndarray, x: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Each mode's database and query vectors and final lists on the collection ``(ids, x)``
    (unit rows), all-pairs, as ``exact_rerank(x, x, mode, N_RERANK, ALPHA, q_in_g=True)``
    and a search of its queries in its database give them."""
    from cbir_lib.neighbors.rerank import augment

    order = np.argsort(ids)

    def augmented(v, vals, nids):
        rows = order[np.searchsorted(ids, nids, sorter=order)]
        return np.concatenate([augment(v[s : s + 4096], v[rows[s : s + 4096]], vals[s : s + 4096], ALPHA) for s in range(0, len(v), 4096)])

    out = {}
    v0, l0 = topk(x, ids, x, ids, max(K, N_RERANK))
    out["none"] = {"lists": l0[:, :K]}
    aug = augmented(x, v0[:, :N_RERANK], l0[:, :N_RERANK])  # DBA's database = alpha-QE's queries
    out["alpha_qe"] = {"queries": aug, "lists": topk(aug, ids, x, ids, K)[1]}
    v1, l1 = topk(aug, ids, aug, ids, max(K, N_RERANK))
    out["dba"] = {"database": aug, "lists": l1[:, :K]}
    q2 = augmented(aug, v1[:, :N_RERANK], l1[:, :N_RERANK])
    out["dba+alpha_qe"] = {"database": aug, "queries": q2, "lists": topk(q2, ids, aug, ids, K)[1]}
    return out


def self_check(x: np.ndarray, m: int = 1500) -> None:
    """:func:`modes` on ``m`` rows gives the vectors of ``rerank.exact_rerank`` (which picks
    the top-n by argpartition: equal where no scores tie at the n-th)."""
    from cbir_lib.neighbors.rerank import exact_rerank

    x = np.ascontiguousarray(x[:m])
    got = modes(np.arange(m, dtype=np.int64), x)
    for mode in MODES[1:]:
        q, g = exact_rerank(x, x, mode, N_RERANK, ALPHA, q_in_g=True)
        want = {"queries": q, "database": g}
        for part in ("queries", "database"):
            if part in got[mode]:
                same = np.isclose(got[mode][part], want[part], atol=1e-6).all(1).mean()
                if same < 0.99:
                    raise SystemExit(f"self-check: {mode} {part}: {same:.3f} of the rows as exact_rerank's")


def churn(before: dict, after: dict, ids_b: np.ndarray, ids_a: np.ndarray, stayed: np.ndarray) -> dict:
    """The shares of the ``stayed`` ids whose lists, database vectors and queries differ."""
    ob, oa = np.argsort(ids_b), np.argsort(ids_a)
    rb, ra = ob[np.searchsorted(ids_b, stayed, sorter=ob)], oa[np.searchsorted(ids_a, stayed, sorter=oa)]
    assert (ids_b[rb] == stayed).all() and (ids_a[ra] == stayed).all()
    out = {}
    for mode in MODES:
        b, a = before[mode], after[mode]
        lb, la = b["lists"][rb], a["lists"][ra]
        row = {
            "lists_changed": round(float((lb != la).any(1).mean()), 5),
            "sets_changed": round(float((np.sort(lb, 1) != np.sort(la, 1)).any(1).mean()), 5),
        }
        redo = np.zeros(len(stayed), bool)
        if "database" in b:
            moved = (b["database"][rb] != a["database"][ra]).any(1)
            row["database_changed"] = round(float(moved.mean()), 5)
            # a list holding a moved database vector (before or after) has a score to redo
            moved_ids = np.union1d(stayed[moved], np.setdiff1d(ids_a, stayed))
            redo |= np.isin(la, moved_ids).any(1) | np.isin(lb, moved_ids).any(1)
        if "queries" in b:
            q_moved = (b["queries"][rb] != a["queries"][ra]).any(1)
            row["queries_changed"] = round(float(q_moved.mean()), 5)
            redo |= q_moved
        if mode != "none":
            row["must_redo"] = round(float(redo.mean()), 5)
        out[mode] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("fashion", "real", "mixture"), default="fashion")
    ap.add_argument("--n", type=int, default=60_000, help="the collection before the first night")
    ap.add_argument("--nights", type=int, default=1)
    args = ap.parse_args()
    from incremental import _commit, collection, draw_night

    ids, x, pool = collection(args.data, args.n)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    self_check(x)
    versions = np.zeros(len(ids), np.int64)
    rng = np.random.default_rng(17)
    used, next_id = 0, int(ids.max()) + 1
    t = time.perf_counter()
    before = modes(ids, x)
    pass_s = time.perf_counter() - t
    rows = []
    for night in range(1, args.nights + 1):
        d = draw_night(rng, ids, x, versions, pool, used, next_id)
        t = time.perf_counter()
        after = modes(d.ids, d.x)
        pass_s = max(pass_s, time.perf_counter() - t)
        stayed = np.setdiff1d(ids, np.union1d(d.deleted_ids, d.changed_ids))
        row = {
            "night": night,
            "added": int(d.new_ids.size),
            "deleted": int(d.deleted_ids.size),
            "changed": int(d.changed_ids.size),
            "stayed": int(stayed.size),
            **churn(before, after, ids, d.ids, stayed),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        ids, x, versions, used, next_id, before = d.ids, d.x, d.versions, d.used, d.next_id, after
    out = {
        "data": args.data,
        "n_base": args.n,
        "dim": int(x.shape[1]),
        "k": K,
        "rerank_n": N_RERANK,
        "alpha": ALPHA,
        "machine_cores": os.cpu_count(),
        "code": _commit(),
        "slowest_all_modes_pass_s": round(pass_s, 1),
        "nights": rows,
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[f"{args.data}_{args.n}"] = out
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
