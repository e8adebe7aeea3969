"""Copy verification of a candidate pair: do two images show the same picture?

A global descriptor (pHash, CNN embedding) cannot tell "the same photo, cropped or
rotated" from "another photo of the same kind of thing": on product photos the two overlap
(benchmarks/results/quality.json). This module checks one candidate pair directly, on
grayscale images at most ``max_side`` pixels on their longer side:

1. **geometric**: ORB keypoints of both images, matched with Lowe's ratio test, and a
   similarity transform (rotation, uniform scale, translation) fitted by RANSAC; the
   *inliers* are the matches it explains. The mirror image of ``a`` is tried as well, so a
   flipped copy is found like any other.
   If the images agree better under a full affine transform (an aspect-ratio change), that
   one is taken.
2. **photometric**: ``a`` warped by that transform onto ``b``, and the normalised
   cross-correlation of the two, block by block over their overlap, the median over the
   textured blocks being the *agreement* (-1..1; -1 where there is no transform or the
   overlap is under 10 % of ``b``). A shared caption, logo or banner gives many inliers
   between different pictures, but the rest of the frame then disagrees; a caption added to
   one copy covers a few blocks and the median passes over them.

Pure numpy + OpenCV; the Spark adapter is :func:`cbir_lib.dedup.run.verified_pairs`.
OpenCV's RANSAC is seeded, so a pair's verdict is the same on every run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

MIN_OVERLAP = 0.1


@dataclass(frozen=True)
class Verdict:
    inliers: int
    agreement: float
    mirrored: bool


def prepare(data: bytes, max_side: int = 512) -> bytes | None:
    """The image as the PNG of its grayscale, at most ``max_side`` px (EXIF rotation
    honoured); ``None`` where it cannot be decoded."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (max_side, max_side))  # JPEG: decode at a reduced size
            gray = ImageOps.exif_transpose(img).convert("L")
            gray.thumbnail((max_side, max_side))
            out = io.BytesIO()
            gray.save(out, format="PNG", compress_level=1)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - any undecodable file is simply not verifiable
        return None


def gray(payload: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_GRAYSCALE)


def _features(img: np.ndarray, n: int):
    import cv2

    kp, des = cv2.ORB_create(nfeatures=n).detectAndCompute(img, None)
    return np.float32([k.pt for k in kp]).reshape(-1, 2), des


def _ncc(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else -1.0


def _one(a: np.ndarray, b: np.ndarray, fa, fb, ratio: float, reproj: float) -> tuple[int, float]:
    """``a`` (float32) against ``b`` (float32) given both images' ORB features."""
    import cv2

    (pa, da), (pb, db) = fa, fb
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return 0, -1.0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(da, db, k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < ratio * n.distance]
    if len(good) < 3:
        return 0, -1.0
    src, dst = pa[[m.queryIdx for m in good]], pb[[m.trainIdx for m in good]]
    h, w = b.shape
    best = (0, -1.0)
    ones = np.ones(a.shape, np.float32)
    # A similarity transform first (rotation, uniform scale, shift: the common edits), then a
    # full affine one (an aspect-ratio change); the better-agreeing of the two is the verdict.
    for estimate in (cv2.estimateAffinePartial2D, cv2.estimateAffine2D):
        cv2.setRNGSeed(0)
        transform, mask = estimate(src, dst, method=cv2.RANSAC, ransacReprojThreshold=reproj, maxIters=2000, confidence=0.99)
        if transform is None:
            continue
        inliers = int(mask.sum())
        warped = cv2.warpAffine(a, transform, (w, h))
        valid = cv2.warpAffine(ones, transform, (w, h), flags=cv2.INTER_NEAREST) > 0.5
        agreement = _blockwise_agreement(warped, b, valid) if valid.mean() >= MIN_OVERLAP else -1.0
        best = max(best, (inliers, agreement), key=lambda r: (r[1], r[0]))
    return best


def _blockwise_agreement(x: np.ndarray, y: np.ndarray, valid: np.ndarray, grid: int = 8, min_std: float = 8.0) -> float:
    """Median NCC over the textured blocks of a ``grid`` x ``grid`` split of the overlap.

    The median lets a local occlusion (a caption, a logo: a few blocks) pass where the rest of
    the frame agrees, and fails two different pictures that share one, since then most textured
    blocks disagree. Flat blocks (white background) say nothing either way and are skipped.
    Fewer than 4 textured blocks: the NCC of the whole overlap."""
    h, w = y.shape
    scores = []
    for i in range(grid):
        for j in range(grid):
            sl = (slice(i * h // grid, (i + 1) * h // grid), slice(j * w // grid, (j + 1) * w // grid))
            m = valid[sl]
            if m.mean() < 0.5:
                continue
            xs, ys = x[sl][m], y[sl][m]
            if max(xs.std(), ys.std()) < min_std:
                continue
            scores.append(_ncc(xs, ys))
    if len(scores) < 4:
        return _ncc(x[valid], y[valid])
    return float(np.median(scores))


def verify(a: np.ndarray, b: np.ndarray, features: int = 1000, ratio: float = 0.8, reproj: float = 4.0) -> Verdict:
    """The better of ``a`` and its mirror image against ``b`` (more inliers, then agreement)."""
    fb = _features(b, features)
    b32 = b.astype(np.float32)
    best = Verdict(0, -1.0, False)
    for mirrored in (False, True):
        img = np.ascontiguousarray(a[:, ::-1]) if mirrored else a
        inliers, agreement = _one(img.astype(np.float32), b32, _features(img, features), fb, ratio, reproj)
        if (inliers, agreement) > (best.inliers, best.agreement):
            best = Verdict(inliers, agreement, mirrored)
    return best
