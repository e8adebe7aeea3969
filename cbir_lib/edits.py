"""Copy-detection edits: the kinds of change that copy-detection benchmarks (DISC21, AugLy)
apply to a photo, each with a strength drawn per copy.

``edit(img, kind, rng)`` returns the edited copy as JPEG bytes. The strength of each edit
comes from ``rng`` (a ``random.Random``), so one seed gives the same set on every run and
different copies of a set get different strengths: the quality figures measure an
ability, not one parameter. The kinds:

- ``crop_heavy``: a window of 30-60 % of the area, anywhere in the frame;
- ``rotate90``: a quarter, half or three-quarter turn;
- ``pad_canvas``: the photo letterboxed onto a canvas of another aspect ratio, in a flat
  colour;
- ``meme``: the photo shrunk onto a larger white canvas with a caption above and below;
- ``rotate_shear``: a small rotation (3-12 degrees) and a shear (0.05-0.2), canvas grown;
- ``greyscale``: the luminance only;
- ``blur_noise``: a Gaussian blur (radius 1-2.5) and Gaussian noise (sigma 4-14).

Pure Pillow and numpy; the near-duplicate benchmark (``benchmarks/quality.py --dedup``) and
the dedup tests use it. The older, fixed edits of the demo sample are
:func:`cbir_lib.sample._transform`.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ("crop_heavy", "rotate90", "pad_canvas", "meme", "rotate_shear", "greyscale", "blur_noise")

_CAPTIONS = (
    "when the weekend finally arrives",
    "NEW IN - limited stock",
    "me vs the one I ordered",
    "tag someone who needs this",
    "best deal of the year!!",
    "can't stop thinking about it",
)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def edited(img: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """The edited image (RGB); see the module docstring for each ``kind``."""
    img = img.convert("RGB")
    w, h = img.size
    if kind == "crop_heavy":
        area = rng.uniform(0.30, 0.60)
        aspect = rng.uniform(0.75, 1.33)
        cw = max(8, min(w, round(w * (area * aspect) ** 0.5)))
        ch = max(8, min(h, round(h * (area / aspect) ** 0.5)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return img.crop((x, y, x + cw, y + ch))
    if kind == "rotate90":
        return img.transpose(rng.choice((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)))
    if kind == "pad_canvas":
        ratio = rng.choice((16 / 9, 9 / 16, 1.0, 4 / 3, 3 / 4))
        if abs(ratio - w / h) < 0.15:
            ratio = w / h * 1.6 if w / h < 1.2 else w / h / 1.8
        cw, ch = (max(w, round(h * ratio)), h) if ratio > w / h else (w, max(h, round(w / ratio)))
        fill = rng.choice(((0, 0, 0), (255, 255, 255), (24, 24, 24), (200, 200, 200)))
        canvas = Image.new("RGB", (cw, ch), fill)
        canvas.paste(img, ((cw - w) // 2, (ch - h) // 2))
        return canvas
    if kind == "meme":
        scale = rng.uniform(0.6, 0.85)
        pw, ph = max(8, round(w * scale)), max(8, round(h * scale))
        band = max(12, round(h * rng.uniform(0.12, 0.2)))
        canvas = Image.new("RGB", (w, ph + 2 * band), (255, 255, 255))
        canvas.paste(img.resize((pw, ph), Image.LANCZOS), ((w - pw) // 2, band))
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=max(10, band // 2))
        draw.text((w // 20, band // 4), rng.choice(_CAPTIONS), fill=(0, 0, 0), font=font)
        draw.text((w // 20, ph + band + band // 4), rng.choice(_CAPTIONS), fill=(0, 0, 0), font=font)
        return canvas
    if kind == "rotate_shear":
        angle = rng.uniform(3, 12) * rng.choice((-1, 1))
        shear = rng.uniform(0.05, 0.2) * rng.choice((-1, 1))
        sheared = img.transform(
            (w + round(abs(shear) * h), h),
            Image.Transform.AFFINE,
            (1, shear, -abs(shear) * h if shear > 0 else 0, 0, 1, 0),
            resample=Image.BILINEAR,
        )
        return sheared.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=(0, 0, 0))
    if kind == "greyscale":
        return img.convert("L").convert("RGB")
    if kind == "blur_noise":
        out = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5))), np.float32)
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(4, 14), out.shape)
        return Image.fromarray(np.clip(out + noise, 0, 255).astype(np.uint8))
    raise ValueError(f"unknown edit {kind!r}; one of {KINDS}")


def edit(img: Image.Image, kind: str, rng: random.Random) -> bytes:
    """The edited copy as JPEG bytes."""
    return _jpeg(edited(img, kind, rng))
