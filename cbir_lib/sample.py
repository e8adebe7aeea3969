"""The embedded demo sample: real photos shipped by scikit-image, and edited copies of each.

``make_sample(dir)`` writes, for every original, the original and six edited copies
(crop, flip, rotation, rescale, JPEG re-compression, brightness) as JPEG, plus a few bad
files, and ``groups.csv`` recording which copy belongs to which original: the ground
truth of near-duplicate and retrieval quality on the sample. Generation is
deterministic, so reruns produce byte-identical files (and an incremental ingest sees
no change).
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

# Photographs bundled in the scikit-image wheel (no download needed).
ORIGINALS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "camera",
    "moon",
)

TRANSFORMS = ("original", "crop", "flip", "rotate", "rescale", "jpeg_q20", "brighten", "overlay_text")

GROUPS_FILE = "groups.csv"


def _load(name: str) -> Image.Image:
    import skimage.data

    arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    if arr.ndim == 2:
        return Image.fromarray(arr).convert("L")
    return Image.fromarray(arr[..., :3]).convert("RGB")


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _transform(img: Image.Image, kind: str) -> bytes:
    w, h = img.size
    if kind == "original":
        return _jpeg(img)
    if kind == "crop":  # keep the central 75 %
        return _jpeg(img.crop((w // 8, h // 8, w - w // 8, h - h // 8)))
    if kind == "flip":
        return _jpeg(ImageOps.mirror(img))
    if kind == "rotate":
        return _jpeg(img.rotate(15, resample=Image.BILINEAR, expand=True, fillcolor=0 if img.mode == "L" else (0, 0, 0)))
    if kind == "rescale":
        return _jpeg(img.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS))
    if kind == "jpeg_q20":
        return _jpeg(img, quality=20)
    if kind == "brighten":
        return _jpeg(ImageEnhance.Brightness(img).enhance(1.4))
    if kind == "overlay_text":  # a caption banner across the lower third, as on reposted images
        out = img.convert("RGB")
        draw = ImageDraw.Draw(out)
        size = max(10, h // 12)
        font = ImageFont.load_default(size=size)
        top = int(h * 0.62)
        draw.rectangle((0, top, w, top + int(size * 1.5)), fill=(255, 255, 255))
        draw.text((w // 20, top + size // 6), "SALE -50% cbir.example", fill=(200, 0, 0), font=font)
        return _jpeg(out)
    raise ValueError(f"unknown transform {kind!r}")


def _bad_files() -> dict[str, bytes]:
    good = _jpeg(Image.fromarray(np.full((64, 64, 3), 128, np.uint8)))
    return {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "not_an_image.jpg": b"this is a text file pretending to be a JPEG\n" * 20,
    }


def make_sample(directory: str) -> dict[str, int]:
    """Write the sample under ``directory``; returns counts. Idempotent."""
    images = images_dir(directory)
    os.makedirs(os.path.join(images, "photos"), exist_ok=True)
    os.makedirs(os.path.join(images, "bad"), exist_ok=True)
    rows = []
    for name in ORIGINALS:
        img = _load(name)
        for kind in TRANSFORMS:
            rel = f"photos/{name}__{kind}.jpg"
            _write_if_changed(os.path.join(images, rel), _transform(img, kind))
            rows.append({"file": rel, "group": name, "transform": kind, "is_original": int(kind == "original")})
    for fname, data in _bad_files().items():
        _write_if_changed(os.path.join(images, "bad", fname), data)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["file", "group", "transform", "is_original"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_if_changed(os.path.join(directory, GROUPS_FILE), buf.getvalue().encode("utf-8"))
    return {"photos": len(rows), "groups": len(ORIGINALS), "bad": len(_bad_files())}


def images_dir(directory: str) -> str:
    """Where the sample's image files are (``groups.csv`` sits one level up, out of the scan)."""
    return os.path.join(directory, "images")


def _write_if_changed(path: str, data: bytes) -> None:
    # Keeping an identical file untouched keeps its mtime, so incremental ingest skips it.
    if os.path.exists(path):
        with open(path, "rb") as fh:
            if fh.read() == data:
                return
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def read_groups(directory: str) -> list[dict[str, str]]:
    with open(os.path.join(directory, GROUPS_FILE), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
