"""Binary codes and hierarchical search, in plain numpy.

- codes are packed bits, ``(n, ceil(B / 8))`` uint8 (``np.packbits`` order: bit ``j`` of
  the code is bit ``7 - j % 8`` of byte ``j // 8``);
- :class:`MultiIndex` finds a query's Hamming-nearest codes without scanning them all:
  the code is cut into ``m`` chunks with one hash table each, and the tables are probed
  at growing per-chunk radius ``s``. By the pigeonhole principle every code within
  Hamming distance ``m (s + 1) - 1`` of the query agrees with it to within ``s`` bits in
  at least one chunk, so after probing radius ``s`` every code that close has been seen
  (Norouzi, Punjani and Fleet, "Fast search in Hamming space with multi-index hashing",
  CVPR 2012);
- :func:`hierarchical_search` is the search of Lin et al. (CVPRW 2015): the Hamming-close
  codes are the coarse candidates, re-ranked by the float features.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cbir_lib.vectors.topk import row_dots

POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def pack(bits: np.ndarray) -> np.ndarray:
    """Boolean ``(n, B)`` -> packed ``(n, ceil(B / 8))`` uint8."""
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(f"expected (n, B) bits, got shape {bits.shape}")
    return np.packbits(bits.astype(bool), axis=1)


def unpack(codes: np.ndarray, n_bits: int) -> np.ndarray:
    return np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=n_bits).astype(bool)


def threshold(activations: np.ndarray, at: float | np.ndarray = 0.5) -> np.ndarray:
    """Packed codes from activations: bit set where the activation is above ``at``
    (0.5 for sigmoid units, Lin et al.; a per-dimension mean for mean-threshold codes)."""
    return pack(np.asarray(activations) > at)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed codes: ``a`` (n, W) vs ``b`` (m, W) -> (n, m) int32."""
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"codes of {a.shape[1]} and {b.shape[1]} bytes cannot be compared")
    out = np.empty((len(a), len(b)), dtype=np.int32)
    step = max(1, 2_000_000 // max(1, len(b) * a.shape[1]))  # bound the (step, m, W) temporary
    for i in range(0, len(a), step):
        out[i : i + step] = POPCOUNT[a[i : i + step, None, :] ^ b[None, :, :]].sum(axis=2, dtype=np.int32)
    return out


def hamming64(a, b) -> np.ndarray:
    """Bit differences of signed or unsigned 64-bit integers (elementwise, broadcast): the
    perceptual hashes of the images table and of dedup's signatures."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)).view(np.uint64)
    return POPCOUNT[x.reshape(-1, 1).view(np.uint8)].sum(axis=1).reshape(np.shape(x)).astype(np.int32)


def hamming_rank(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery positions of each query by Hamming distance alone (ties: lower position
    first), and the distances. Scans every code: the baseline of the coarse step."""
    d = hamming(q, g)
    k = min(k, d.shape[1])
    # A stable sort on distance breaks ties by position, deterministically.
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def _chunk_bounds(n_bytes: int, n_chunks: int) -> list[tuple[int, int]]:
    """Byte ranges of ``n_chunks`` nearly equal chunks (each at most 3 bytes: a 24-bit key)."""
    if not 1 <= n_chunks <= n_bytes:
        raise ValueError(f"n_chunks must be in 1..{n_bytes} for {n_bytes}-byte codes, got {n_chunks}")
    cuts = np.linspace(0, n_bytes, n_chunks + 1).round().astype(int)
    bounds = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    if max(b - a for a, b in bounds) > 3:
        raise ValueError(f"{n_chunks} chunks of a {n_bytes}-byte code exceed 24 bits each; use more chunks")
    return bounds


def _keys(codes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    key = np.zeros(len(codes), dtype=np.int64)
    for j in range(lo, hi):
        key = (key << 8) | codes[:, j].astype(np.int64)
    return key


_MASKS: dict[tuple[int, int], np.ndarray] = {}


def flip_masks(n_bits: int, s: int) -> np.ndarray:
    """Every ``n_bits``-bit mask with exactly ``s`` bits set."""
    key = (n_bits, s)
    if key not in _MASKS:
        _MASKS[key] = np.array([sum(1 << b for b in c) for c in itertools.combinations(range(n_bits), s)], dtype=np.int64)
    return _MASKS[key]


@dataclass
class Probe:
    positions: np.ndarray  # candidate gallery positions, nearest first (Hamming, then position)
    distances: np.ndarray  # their Hamming distances
    radius: int  # every code within this distance was seen
    looked_at: int  # distinct codes whose full distance was computed


class MultiIndex:
    """Hash tables over ``n_chunks`` chunks of packed codes, for Hamming k-NN without a scan."""

    def __init__(self, codes: np.ndarray, n_chunks: int | None = None):
        self.codes = np.ascontiguousarray(codes, dtype=np.uint8)
        n, n_bytes = self.codes.shape
        # Default: 2-byte chunks (16-bit keys): 48 bits -> 3 chunks, 128 bits -> 8.
        self.bounds = _chunk_bounds(n_bytes, n_chunks or max(1, (n_bytes + 1) // 2))
        self.tables = []
        for lo, hi in self.bounds:
            key = _keys(self.codes, lo, hi)
            order = np.argsort(key, kind="stable")
            uniq, starts = np.unique(key[order], return_index=True)
            self.tables.append((uniq, np.append(starts, n), order))

    def __len__(self) -> int:
        return len(self.codes)

    def _bucket(self, table, keys: np.ndarray) -> np.ndarray:
        uniq, starts, order = table
        at = np.searchsorted(uniq, keys)
        hit = (at < len(uniq)) & (uniq[np.minimum(at, len(uniq) - 1)] == keys)
        parts = [order[starts[i] : starts[i + 1]] for i in at[hit]]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def search(self, q: np.ndarray, n: int, max_radius: int | None = None) -> Probe:
        """The ``n`` codes nearest ``q`` (one packed code) in Hamming distance, exactly:
        the per-chunk radius grows until ``n`` codes lie within the guaranteed radius."""
        q = np.asarray(q, dtype=np.uint8).reshape(1, -1)
        m = len(self.bounds)
        n = min(n, len(self.codes))
        seen = np.zeros(len(self.codes), dtype=bool)
        found: list[np.ndarray] = []
        qkeys = [int(_keys(q, lo, hi)[0]) for lo, hi in self.bounds]
        widest = max(8 * (hi - lo) for lo, hi in self.bounds)
        s = 0
        dist = np.empty(0, dtype=np.int32)
        pos = np.empty(0, dtype=np.int64)
        while True:
            new = []
            for (lo, hi), table, qk in zip(self.bounds, self.tables, qkeys, strict=True):
                bits = 8 * (hi - lo)
                if s > bits:
                    continue
                cand = self._bucket(table, qk ^ flip_masks(bits, s))
                cand = cand[~seen[cand]]
                seen[cand] = True
                new.append(cand)
            fresh = np.concatenate(new) if new else np.empty(0, dtype=np.int64)
            if len(fresh):
                found.append(fresh)
                pos = np.concatenate(found)
                dist = hamming(q, self.codes[pos])[0]
            radius = m * (s + 1) - 1
            if s >= widest:
                radius = 8 * self.codes.shape[1]
            if int((dist <= radius).sum()) >= n or s >= widest or (max_radius is not None and radius >= max_radius):
                break
            s += 1
        order = np.lexsort((pos, dist))[:n]
        return Probe(pos[order], dist[order], min(radius, 8 * self.codes.shape[1]), len(pos))


def hierarchical_search(
    q_vec: np.ndarray,
    q_code: np.ndarray,
    g_vec: np.ndarray,
    index: MultiIndex,
    k: int,
    n_candidates: int,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse-to-fine top-``k``: the ``n_candidates`` Hamming-nearest codes of each query,
    re-ranked by the inner product of the float features (cosine for unit vectors).

    ``exclude`` (one gallery position per query, or -1) drops the query itself. Returns
    ``(positions (nq, k), scores (nq, k), scored (nq,))``; rows with fewer than ``k``
    candidates are padded with -1 and -inf. ``scored`` is how many float vectors each
    query compared, the cost this search saves.
    """
    q_vec = np.asarray(q_vec, dtype=np.float32)
    g_vec = np.asarray(g_vec, dtype=np.float32)
    nq = len(q_vec)
    pos_out = np.full((nq, k), -1, dtype=np.int64)
    score_out = np.full((nq, k), -np.inf, dtype=np.float32)
    scored = np.zeros(nq, dtype=np.int64)
    extra = 1 if exclude is not None else 0
    for i in range(nq):
        cand = index.search(q_code[i], n_candidates + extra).positions
        if exclude is not None and exclude[i] >= 0:
            cand = cand[cand != exclude[i]][:n_candidates]
        else:
            cand = cand[:n_candidates]
        s = row_dots(g_vec[cand], q_vec[i])  # as the grouped search scores them
        scored[i] = len(cand)
        top = np.lexsort((cand, -s))[:k]
        pos_out[i, : len(top)] = cand[top]
        score_out[i, : len(top)] = s[top]
    return pos_out, score_out, scored
