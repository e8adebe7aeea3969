"""Near-duplicate cores in plain numpy: Hamming multi-index keys and connected components.

Multi-index hashing (Norouzi et al. 2012): split a 64-bit hash into ``m`` chunks. If two
hashes differ in at most ``t`` bits, by the pigeonhole principle some chunk differs in at
most ``floor(t / m)`` bits. So every hash is *stored* under its exact chunk values and
*probes* every value within radius ``floor(t / m)`` of its chunks; pairs meeting under a
key are candidates, verified with the full Hamming distance. No pair within ``t`` is
missed, and only hashes sharing a (near) chunk are compared, never all pairs.
"""

from __future__ import annotations

import numpy as np

from cbir_lib.vectors.codes import flip_masks, hamming64


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
    """Every XOR mask of ``width`` bits with at most ``radius`` bits set (0 first): the
    masks of :func:`~cbir_lib.vectors.codes.flip_masks`, radius by radius."""
    return np.concatenate([flip_masks(width, r) for r in range(radius + 1)])


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
    """Each node's component label, the smallest node index in it.

    Vectorised min-label propagation: each round every edge's smaller label goes to both
    ends and to the nodes their labels name (hooking), then labels follow labels to a fixed
    point (pointer jumping). Labels only fall and always name a node of the same component,
    so at the fixed point, where every edge's two ends agree, a component's label is its
    smallest node. About a second for a million edges (a Python union-find took several)."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    label = np.arange(n)
    while len(e):
        la, lb = label[e[:, 0]], label[e[:, 1]]
        m = np.minimum(la, lb)
        new = label.copy()
        for target in (e[:, 0], e[:, 1], la, lb):
            np.minimum.at(new, target, m)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            break
        label = new
    return label


def _adjacency(n: int, edges: np.ndarray) -> list[np.ndarray]:
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    both = np.concatenate([e, e[:, ::-1]])
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    starts = np.searchsorted(both[:, 0], np.arange(n + 1))
    return [both[starts[i] : starts[i + 1], 1] for i in range(n)]


def hops_from(adj: list[np.ndarray], source: int, allowed: np.ndarray) -> np.ndarray:
    """Breadth-first hop counts from ``source`` over the ``allowed`` nodes (-1: unreached)."""
    dist = np.full(len(adj), -1, np.int64)
    dist[source] = 0
    frontier = [source]
    while frontier:
        nxt = []
        for u in frontier:
            for v in adj[u]:
                if allowed[v] and dist[v] < 0:
                    dist[v] = dist[u] + 1
                    nxt.append(int(v))
        frontier = nxt
    return dist


EXACT_UP_TO = 200  # nodes: exact diameters and betweenness cuts up to this (each O(nodes x edges) in Python)


def diameter(adj: list[np.ndarray], nodes: np.ndarray, exact_up_to: int = EXACT_UP_TO) -> int:
    """Hop diameter of the connected subgraph on ``nodes``: every node's eccentricity up to
    ``exact_up_to`` nodes, else a double sweep (a lower bound, exact on trees)."""
    allowed = np.zeros(len(adj), bool)
    allowed[nodes] = True
    if len(nodes) <= exact_up_to:
        return int(max(hops_from(adj, int(u), allowed).max() for u in nodes))
    far = int(np.argmax(hops_from(adj, int(nodes[0]), allowed)))
    return int(hops_from(adj, far, allowed).max())


def edge_betweenness(adj: list[np.ndarray], nodes: np.ndarray) -> dict[tuple[int, int], float]:
    """Brandes' edge betweenness of the subgraph on ``nodes`` (unweighted): for each edge
    ``(u < v)``, the share of shortest paths between node pairs that cross it."""
    allowed = np.zeros(len(adj), bool)
    allowed[nodes] = True
    score: dict[tuple[int, int], float] = {}
    for s in nodes.tolist():
        order: list[int] = []
        preds: dict[int, list[int]] = {s: []}
        sigma, dist = {s: 1.0}, {s: 0}
        frontier = [s]
        while frontier:
            nxt = []
            for u in frontier:
                order.append(u)
                for v in adj[u].tolist():
                    if not allowed[v]:
                        continue
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        sigma[v], preds[v] = 0.0, []
                        nxt.append(v)
                    if dist[v] == dist[u] + 1:
                        sigma[v] += sigma[u]
                        preds[v].append(u)
            frontier = nxt
        delta = dict.fromkeys(order, 0.0)
        for w in reversed(order):
            for u in preds[w]:
                c = sigma[u] / sigma[w] * (1.0 + delta[w])
                key = (min(u, w), max(u, w))
                score[key] = score.get(key, 0.0) + c
                delta[u] += c
    return score


def split_by_diameter(n: int, edges: np.ndarray, max_diameter: int, max_cuts: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Clusters of the graph whose hop diameter is at most ``max_diameter``.

    A connected component within the bound stays whole. One beyond it (copies of copies,
    or a false edge joining two groups) loses its edge of highest betweenness (the one most
    shortest paths cross: a bridge between two groups; Girvan and Newman 2002), again until
    every piece is within the bound. After ``max_cuts`` cuts, or in a piece of more than
    :data:`EXACT_UP_TO` nodes, it is cut into balls instead: the node of least eccentricity
    (in a larger piece, of highest degree) takes every node within ``max_diameter // 2``
    hops, and so on; a giant component is cut in one pass, O(edges). Returns ``(labels,
    diameters)``: each node's piece, labelled by its smallest node, and the diameter of each
    node's component before the split.
    """
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    e = np.unique(np.sort(e[e[:, 0] != e[:, 1]], axis=1), axis=0) if len(e) else e
    comp = components(n, e)
    labels = np.arange(n)
    before = np.zeros(n, np.int64)
    adj = _adjacency(n, e)
    for c in np.unique(comp):
        nodes = np.flatnonzero(comp == c)
        if len(nodes) < 2:
            continue
        d = diameter(adj, nodes)
        before[nodes] = d
        if d <= max_diameter:
            labels[nodes] = nodes.min()
            continue
        for part in _split(nodes, {tuple(x) for x in e[np.isin(e[:, 0], nodes)].tolist()}, max_diameter, max_cuts):
            labels[part] = part.min()
    return labels, before


def _within(edges: set[tuple[int, int]], part: np.ndarray) -> np.ndarray:
    members = set(part.tolist())
    return np.array(sorted((a, b) for a, b in edges if a in members and b in members), np.int64).reshape(-1, 2)


def _pieces(n: int, edges: set[tuple[int, int]], part: np.ndarray) -> list[np.ndarray]:
    lab = components(n, _within(edges, part))[part]
    return [part[lab == r] for r in np.unique(lab)]


def _balls(adj: list[np.ndarray], part: np.ndarray, radius: int) -> list[np.ndarray]:
    """A large piece cut into balls in one pass, O(edges): the remaining node of highest
    degree takes every remaining node within ``radius`` hops (through remaining nodes, so
    each ball is connected through its centre), and so on."""
    left = np.zeros(len(adj), bool)
    left[part] = True
    out = []
    for centre in sorted(part.tolist(), key=lambda u: (-len(adj[u]), u)):
        if not left[centre]:
            continue
        ball, frontier = [centre], [centre]
        left[centre] = False
        for _ in range(radius):
            nxt = []
            for u in frontier:
                for v in adj[u].tolist():
                    if left[v]:
                        left[v] = False
                        nxt.append(v)
            ball += nxt
            frontier = nxt
        out.append(np.array(sorted(ball)))
    return out


def _split(nodes: np.ndarray, edges: set[tuple[int, int]], max_diameter: int, max_cuts: int) -> list[np.ndarray]:
    n = int(nodes.max()) + 1
    cuts = 0
    todo, done = [nodes], []
    while todo:
        part = todo.pop()
        adj = _adjacency(n, _within(edges, part))
        if len(part) == 1 or diameter(adj, part) <= max_diameter:
            done.append(part)
            continue
        if cuts < max_cuts and len(part) <= EXACT_UP_TO:
            bet = edge_betweenness(adj, part)
            edges = edges - {max(bet.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]}
            cuts += 1
            todo.extend(_pieces(n, edges, part))
            continue
        if len(part) > EXACT_UP_TO:
            done.extend(_balls(adj, part, max_diameter // 2))
            continue
        mask = np.zeros(n, bool)
        mask[part] = True
        centre = int(part[int(np.argmin([int(hops_from(adj, int(u), mask).max()) for u in part]))])
        dist = hops_from(adj, centre, mask)
        ball = np.flatnonzero((dist >= 0) & (dist <= max_diameter // 2))
        done.append(ball)
        rest = np.setdiff1d(part, ball)
        if len(rest):
            todo.extend(_pieces(n, edges, rest))
    return done


def worst_pair(x: np.ndarray) -> tuple[float, int, int]:
    """The least similar two rows of ``x`` (cosine) and their positions."""
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = x @ x.T
    np.fill_diagonal(s, np.inf)
    i, j = np.unravel_index(int(np.argmin(s)), s.shape)
    return float(s[i, j]), int(min(i, j)), int(max(i, j))
