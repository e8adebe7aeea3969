"""Driver memory: thousands of identical pHashes give linear pairs; full training's validation bytes are bounded."""

from __future__ import annotations

import numpy as np

from cbir_lib.dedup.run import phash_pairs


def _components(n_ids, pairs):
    parent = {i: i for i in n_ids}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups = {}
    for i in n_ids:
        groups.setdefault(find(i), set()).add(i)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def test_identical_hashes_give_linear_pairs_and_the_naive_components(spark):
    rng = np.random.default_rng(0)
    placeholder = int(rng.integers(-(2**63), 2**63 - 1))
    hashes = [placeholder] * 3000
    base = [int(x) for x in rng.integers(-(2**63), 2**63 - 1, size=40)]
    for h in base:  # 40 photos, each with a copy 1-2 bits away
        flipped = np.int64(h) ^ np.int64(1 << int(rng.integers(0, 63))) ^ np.int64(1 << int(rng.integers(0, 63)))
        hashes += [h, int(flipped)]
    ids = list(range(10, 10 + len(hashes)))
    df = spark.createDataFrame(list(zip(ids, hashes, strict=True)), "image_id long, phash long")
    got = phash_pairs(df, 4, 4).select("a", "b").collect()
    assert len(got) < 3000 + 2 * 40  # linear: before, the placeholders alone gave 4,498,500 pairs
    pairs = [(r.a, r.b) for r in got]
    assert all(a < b for a, b in pairs)
    h = np.array(hashes, dtype=np.int64).view(np.uint64)
    naive = [(ids[i], ids[j]) for i in range(3000, len(ids)) for j in range(i + 1, len(ids)) if bin(int(h[i] ^ h[j])).count("1") <= 4]
    naive += [(ids[0], ids[j]) for j in range(1, 3000)]  # the placeholders: one component
    assert _components(ids, pairs) == _components(ids, naive)


def test_full_trainings_validation_bytes_are_bounded(spark):
    from cbir_lib.finetune.run import bounded_rows

    df = spark.createDataFrame([(f"/v/{i}.jpg", bytes(1000), i % 3) for i in range(50)], "path string, content binary, label int")
    rows, dropped = bounded_rows(df, 10_500)
    assert len(rows) == 10 and dropped == 40 and sum(len(r.content) for r in rows) <= 10_500
    again, _ = bounded_rows(df, 10_500)
    assert [r.path for r in again] == [r.path for r in rows]  # deterministic
    assert bounded_rows(df, 10**9)[1] == 0


def test_identical_dihedral_hashes_give_linear_pairs(spark):
    """The dihedral source (trimmed pHashes under the 8 symmetries) groups identical hashes
    as the pHash source does: 3,000 blank placeholders give 2,999 pairs, not 4.5M."""
    from cbir_lib.dedup.run import dihedral_pairs

    rng = np.random.default_rng(1)
    blank = [int(x) for x in rng.integers(-(2**63), 2**63 - 1, size=8)]
    rows = [(10 + i, blank) for i in range(3000)]
    for j in range(40):  # 40 photos, each with a quarter-turned copy: its hashes permuted
        h = [int(x) for x in rng.integers(-(2**63), 2**63 - 1, size=8)]
        rows += [(5000 + 2 * j, h), (5001 + 2 * j, [h[5], h[7], h[6], h[4], h[0], h[2], h[1], h[3]])]
    df = spark.createDataFrame(rows, "image_id long, hashes array<long>")
    got = {(r.a, r.b) for r in dihedral_pairs(df, 8, 4).select("a", "b").collect()}
    assert len(got) < 3000 + 2 * 40 and all(a < b for a, b in got)
    assert all((5000 + 2 * j, 5001 + 2 * j) in got for j in range(40))
    assert sum(1 for a, b in got if a == 10) == 2999
