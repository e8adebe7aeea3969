"""Near-duplicate cores in plain numpy: Hamming multi-index keys and connected components.

Multi-index hashing (Norouzi et al. 2012): split a 64-bit hash into ``m`` chunks. If two
hashes differ in at most ``t`` bits, by the pigeonhole principle some chunk differs in at
most ``floor(t / m)`` bits. So every hash is *stored* under its exact chunk values and
*probes* every value within radius ``floor(t / m)`` of its chunks; pairs meeting under a
key are candidates, verified with the full Hamming distance. No pair within ``t`` is
missed, and only hashes sharing a (near) chunk are compared, never all pairs.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming64(a, b) -> np.ndarray:
    """Bit differences of signed or unsigned 64-bit integers (elementwise)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)).view(np.uint64)
    return _POP8[x.reshape(-1, 1).view(np.uint8)].sum(axis=1).reshape(np.shape(x)).astype(np.int32)


def chunk_bounds(m: int, bits: int = 64) -> list[tuple[int, int]]:
    """``(shift, width)`` of each of ``m`` nearly equal chunks of a ``bits``-bit hash."""
    if not 1 <= m <= bits:
        raise ValueError(f"chunks must be in 1..{bits}, got {m}")
    widths = [bits // m + (1 if j < bits % m else 0) for j in range(m)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return list(zip(shifts, widths, strict=True))


def chunk_values(h: np.ndarray, m: int) -> np.ndarray:
    """``(n, m)`` chunk values of 64-bit hashes."""
    u = np.asarray(h, dtype=np.int64).view(np.uint64)
    return np.stack([((u >> np.uint64(s)) & np.uint64((1 << w) - 1)).astype(np.int64) for s, w in chunk_bounds(m)], axis=1)


def flips(width: int, radius: int) -> np.ndarray:
    """Every XOR mask of ``width`` bits with at most ``radius`` bits set (0 first)."""
    masks = [0]
    for r in range(1, radius + 1):
        for bits in combinations(range(width), r):
            masks.append(sum(1 << b for b in bits))
    return np.array(masks, dtype=np.int64)


def probe_keys(h: np.ndarray, m: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, chunk, key)`` probes of every hash: each chunk value XOR every mask within
    radius ``t // m``. Store keys are the probes with mask 0."""
    vals = chunk_values(h, m)
    radius = t // m
    rows, chunks, keys = [], [], []
    for j, (_, w) in enumerate(chunk_bounds(m)):
        f = flips(w, min(radius, w))
        k = (vals[:, j : j + 1] ^ f[None, :]).ravel()
        rows.append(np.repeat(np.arange(len(vals)), len(f)))
        chunks.append(np.full(k.size, j, np.int32))
        keys.append(k)
    return np.concatenate(rows), np.concatenate(chunks), np.concatenate(keys)


def near_pairs(h: np.ndarray, t: int, m: int = 4) -> set[tuple[int, int]]:
    """Row pairs ``(i < j)`` with Hamming distance <= ``t``, by the multi-index (numpy)."""
    h = np.asarray(h, dtype=np.int64)
    vals = chunk_values(h, m)
    store: dict[tuple[int, int], list[int]] = {}
    for i in range(len(h)):
        for j in range(m):
            store.setdefault((j, int(vals[i, j])), []).append(i)
    out = set()
    rows, chunks, keys = probe_keys(h, m, t)
    for i, j, key in zip(rows.tolist(), chunks.tolist(), keys.tolist(), strict=True):
        for other in store.get((j, key), ()):
            if other > i and hamming64(h[i], h[other]) <= t:
                out.add((i, other))
    return out


def brute_pairs(h: np.ndarray, t: int) -> set[tuple[int, int]]:
    """The oracle: every pair compared."""
    h = np.asarray(h, dtype=np.int64)
    d = hamming64(h[:, None], h[None, :])
    i, j = np.nonzero(np.triu(d <= t, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find: each node's component label, the smallest node index in it."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in np.asarray(edges, dtype=np.int64).reshape(-1, 2):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])
