"""Copy verification of a candidate pair: do two images show the same picture?

A global descriptor (pHash, CNN embedding) cannot tell "the same photo, cropped or
rotated" from "another photo of the same kind of thing": on product photos the two overlap
(benchmarks/results/quality.json). This module checks one candidate pair directly, from the
two images' copy signatures (:mod:`cbir_lib.dedup.signature`: ORB features of the grayscale
at most ``verify_max_side`` px and of its mirror, and a thumbnail), so no pair decodes:

1. **geometric**: ORB keypoints of both images, matched with Lowe's ratio test, and a
   similarity transform (rotation, uniform scale, translation) fitted by RANSAC; the
   *inliers* are the matches it explains. The mirror image of ``a`` is tried as well, so a
   flipped copy is found like any other. If the images agree better under a full affine
   transform (an aspect-ratio change, a shear), that one is taken.
2. **photometric**, only where the geometry explains ``min_inliers`` matches: ``a``'s
   thumbnail warped by that transform onto ``b``'s, and the normalised
   cross-correlation of the two, block by block over their overlap, the median over the
   textured blocks being the *agreement* (-1..1; -1 where there is no transform or the
   overlap is under half of the image it covers most of). A shared caption, logo or banner gives many inliers
   between different pictures, but the rest of the frame then disagrees; a caption added to
   one copy covers a few blocks and the median passes over them.

Pure numpy + OpenCV; the Spark adapter is :func:`cbir_lib.dedup.run.verified_pairs`.
OpenCV's RANSAC is seeded, so a pair's verdict is the same on every run. Measured costs
(one core, 2026-12-02): about 15 ms per signature and 3 ms per pair, where decoding both
images and matching 1,000 features per pair took about 50 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_OVERLAP = 0.5  # of the image the overlap covers most of (until 2026-12-02: 0.1 of b)


@dataclass(frozen=True)
class Verdict:
    inliers: int
    agreement: float
    mirrored: bool


def _ncc(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else -1.0


def _block_sums(a: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sums of ``a`` over the blocks starting at ``rows`` x ``cols`` (an integral image, float64)."""
    import cv2

    s = cv2.integral(np.ascontiguousarray(a, np.float32), sdepth=cv2.CV_64F)
    r = np.append(rows, a.shape[0])
    c = np.append(cols, a.shape[1])
    return s[r[1:, None], c[None, 1:]] - s[r[:-1, None], c[None, 1:]] - s[r[1:, None], c[None, :-1]] + s[r[:-1, None], c[None, :-1]]


def _blockwise_agreement(x: np.ndarray, y: np.ndarray, valid: np.ndarray, grid: int = 8, min_std: float = 8.0) -> float:
    """Median NCC over the textured blocks of a ``grid`` x ``grid`` split of the overlap.

    The median lets a local occlusion (a caption, a logo: a few blocks) pass where the rest of
    the frame agrees, and fails two different pictures that share one, since then most textured
    blocks disagree. Flat blocks (white background) say nothing either way and are skipped.
    Fewer than 4 textured blocks: the NCC of the whole overlap.

    Vectorised: the masked sums of every block come from integral images (block ``i``
    spans rows ``i * h // grid`` to ``(i + 1) * h // grid``), summed in float64."""
    h, w = y.shape
    rows = (np.arange(grid) * h) // grid
    cols = (np.arange(grid) * w) // grid
    v = valid.astype(np.float32)
    xv, yv = x.astype(np.float32) * v, y.astype(np.float32) * v
    n = _block_sums(v, rows, cols)
    area = np.diff(np.append(rows, h))[:, None] * np.diff(np.append(cols, w))[None, :]
    sx, sy = _block_sums(xv, rows, cols), _block_sums(yv, rows, cols)
    sxx, syy, sxy = _block_sums(xv * xv, rows, cols), _block_sums(yv * yv, rows, cols), _block_sums(xv * yv, rows, cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx = np.maximum(sxx - sx * sx / n, 0.0)
        cyy = np.maximum(syy - sy * sy / n, 0.0)
        cxy = sxy - sx * sy / n
        textured = (n >= 0.5 * area) & (n > 0) & (np.sqrt(np.maximum(cxx, cyy) / n) >= min_std)
        den = np.sqrt(cxx * cyy)
        ncc = np.where(den > 0, cxy / den, -1.0)
    scores = ncc[textured]
    if scores.size < 4:
        return _ncc(x[valid], y[valid])
    return float(np.median(scores))


def _photometric(a_thumb: np.ndarray, b_thumb: np.ndarray, transform: np.ndarray, a_shape, b_shape) -> float:
    """Agreement of ``a`` warped onto ``b`` at the thumbnails' scale, given the transform
    found at the features' scale."""
    import cv2

    sa = np.array([a_thumb.shape[1] / a_shape[1], a_thumb.shape[0] / a_shape[0]])
    sb = np.array([b_thumb.shape[1] / b_shape[1], b_thumb.shape[0] / b_shape[0]])
    t = transform.astype(np.float64).copy()
    t[:, :2] = sb[:, None] * t[:, :2] / sa[None, :]
    t[:, 2] = sb * t[:, 2]
    h, w = b_thumb.shape
    warped = cv2.warpAffine(a_thumb.astype(np.float32), t, (w, h))
    valid = cv2.warpAffine(np.ones(a_thumb.shape, np.float32), t, (w, h), flags=cv2.INTER_NEAREST) > 0.5
    # The overlap, as a share of the image it covers most of: a crop lies wholly inside its
    # original (share 1), while two pictures matched on a strip (a caption moved from the
    # bottom of one to the top of another) overlap on that strip alone.
    a_area = a_thumb.size * abs(float(np.linalg.det(t[:, :2])))
    overlap = max(valid.mean(), float(valid.sum()) / a_area if a_area > 0 else 0.0)
    if overlap < MIN_OVERLAP:
        return -1.0
    return _blockwise_agreement(warped, b_thumb.astype(np.float32), valid)


def verify_signatures(
    sa, sb, min_inliers: int = 15, min_agreement: float = 0.8, ratio: float = 0.8, reproj: float = 4.0, early: bool = True
) -> Verdict:
    """Does ``sa`` show the picture of ``sb`` (two :class:`~cbir_lib.dedup.signature.Signature`)?

    ``a`` and then its mirror image are matched against ``b``; for each, a similarity and
    then an affine transform are fitted, and the photometric check runs only where the
    transform explains at least ``min_inliers`` matches (otherwise the verdict cannot pass
    whatever the pixels say). With ``early``, the first attempt that passes is the verdict,
    and the rest are skipped; without it, every attempt runs and the best (agreement, then
    inliers) is returned, as an offline sweep of the two thresholds needs. Deterministic:
    RANSAC is seeded."""
    import cv2

    best = Verdict(0, -1.0, False)
    if len(sb.descriptors) < 2:
        return best
    for mirrored in _orientations(sa, sb) if early else (False, True):
        pa, da = (sa.mirror_points, sa.mirror_descriptors) if mirrored else (sa.points, sa.descriptors)
        if len(da) < 2:
            continue
        query, train = _ratio_matches(da, sb.descriptors, ratio)
        if len(query) < max(3, min_inliers if early else 3):
            best = max(best, Verdict(len(query) if len(query) >= 3 else 0, -1.0, mirrored), key=_rank)
            continue
        src, dst = pa[query], sb.points[train]
        # A similarity transform first (rotation, uniform scale, shift: the common edits), then
        # a full affine one (an aspect-ratio change, a shear).
        for estimate in (cv2.estimateAffinePartial2D, cv2.estimateAffine2D):
            cv2.setRNGSeed(0)
            transform, mask = estimate(src, dst, method=cv2.RANSAC, ransacReprojThreshold=reproj, maxIters=2000, confidence=0.99)
            if transform is None:
                continue
            inliers = int(mask.sum())
            agreement = -1.0
            if inliers >= min_inliers:  # the pixels (a signature's thumbnail is decoded on first use) only now
                thumb = np.ascontiguousarray(sa.thumb[:, ::-1]) if mirrored else sa.thumb
                agreement = _photometric(thumb, sb.thumb, transform, sa.shape, sb.shape)
            best = max(best, Verdict(inliers, agreement, mirrored), key=_rank)
            if early and inliers >= min_inliers and agreement >= min_agreement:
                return best
    return best


def _ratio_matches(da: np.ndarray, db: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """``(query, train)`` indices of the descriptors of ``da`` whose nearest neighbour in
    ``db`` (Hamming) passes Lowe's ratio test against the second nearest.

    The same matches as ``BFMatcher(NORM_HAMMING).knnMatch(da, db, k=2)`` and the test on
    its ``DMatch`` objects (tested), from OpenCV's ``batchDistance`` as two arrays: a pair's
    800 ``DMatch`` objects cost about a sixth of the matching itself. Where the two nearest
    are at the same distance the test fails whichever is first, so ties do not matter."""
    import cv2

    dist, idx = cv2.batchDistance(da, db, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2)
    query = np.flatnonzero(dist[:, 0] < ratio * dist[:, 1])
    return query, idx[query, 0]


_PLAIN = (0, 3, 5, 6)  # VARIANTS without a reflection: identity, rotate180, rotate_cw, rotate_ccw
_REFLECTED = (1, 2, 4, 7)


def _orientations(sa, sb) -> tuple[bool, bool]:
    """The order to try ``a`` and its mirror image in: the mirror first where one of ``a``'s
    reflected pHashes is nearer to ``b``'s than any of its plain ones. With ``early`` a pair
    passes if either attempt passes, so the order changes the work, never the verdict: a
    mirrored copy is matched once instead of twice."""
    from cbir_lib.vectors.codes import hamming64

    d = hamming64(sa.hashes, sb.hashes[0])
    return (True, False) if d[list(_REFLECTED)].min() < d[list(_PLAIN)].min() else (False, True)


def _rank(v: Verdict) -> tuple[float, int]:
    return (v.agreement, v.inliers)


def verify(
    a: np.ndarray,
    b: np.ndarray,
    features: int = 1000,
    ratio: float = 0.8,
    reproj: float = 4.0,
    min_inliers: int = 15,
    min_agreement: float = 0.8,
) -> Verdict:
    """:func:`verify_signatures` of two grayscale images."""
    from cbir_lib.dedup.signature import signature

    return verify_signatures(signature(a, features), signature(b, features), min_inliers, min_agreement, ratio, reproj)
