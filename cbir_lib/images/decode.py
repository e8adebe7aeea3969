"""Decoding image bytes into RGB arrays: the one place where bad input becomes data.

Every function here returns ``(value, None)`` on success or ``(None, reason)`` on failure
and never raises for a bad file. Reasons start with a short code (``empty_file``,
``not_an_image``, ``truncated``, ``too_large``, ``decode_error``) followed by detail, so
analysts can group failures with SQL: ``split(error, ':')[0]``.

Unusual but valid inputs are normalised, not rejected:
- EXIF orientation is applied, so width/height are as a person sees the photo;
- CMYK, greyscale, 16-bit and palette images are converted to 8-bit RGB;
- alpha is composited on white (product photos on transparent backgrounds stay white);
- animated images use their first frame.

JPEGs are decoded at reduced size when the consumer needs fewer pixels
(``Image.draft``, libjpeg's DCT scaling by 1/2, 1/4 or 1/8), which is several times
faster than a full decode followed by a resize.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse, rather than try, images beyond this many pixels (decompression bombs).
DEFAULT_MAX_PIXELS = 100_000_000

# We enforce our own limit (ingest.max_pixels), with a reason row. Pillow's own guard stays
# on for the whole process (the report and dedup verification rely on it): its warning
# above MAX_IMAGE_PIXELS is silenced, its error at twice that is a too_large row here.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Working memory of a high-bit-depth conversion: rows are converted this many bytes at a time.
CONVERT_BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str
    n_frames: int


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    if data is None or len(data) == 0:
        return None, "empty_file: zero bytes"
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, "not_an_image: unrecognised image format"
    except Image.DecompressionBombError as exc:
        return None, f"too_large: {exc} (Pillow's decompression-bomb guard)"
    except Exception as exc:  # noqa: BLE001 - any parser failure is a property of the file
        return None, _classify(exc)
    w, h = img.size
    if w <= 0 or h <= 0:
        return None, f"decode_error: invalid size {w}x{h}"
    if w * h > max_pixels:
        return None, f"too_large: {w}x{h} = {w * h} pixels exceeds max_pixels {max_pixels}"
    return img, None


def _classify(exc: Exception) -> str:
    if isinstance(exc, MemoryError):  # this worker's state, not the file's: fail the task, Spark retries it
        raise exc
    msg = str(exc)
    low = msg.lower()
    if isinstance(exc, (OSError, SyntaxError, ValueError)) and ("truncat" in low or "broken data stream" in low or "premature" in low):
        return f"truncated: {msg}"
    return f"decode_error: {type(exc).__name__}: {msg}"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any mode to 8-bit RGB, compositing alpha onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _wide_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (incl. Adobe-inverted JPEGs, which PIL handles), YCbCr, LAB, L, 1, HSV ...
    return img.convert("RGB")


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images to 8-bit RGB, a block of rows at a time: the working
    memory is the 8-bit output plus ``CONVERT_BLOCK_BYTES``, not float64 copies of the image
    (3 GB for one 100-megapixel 32-bit TIFF before)."""
    mode = img.mode
    w, h = img.size
    lo, hi = img.getextrema()
    out = np.empty((h, w), dtype=np.uint8)
    step = max(1, CONVERT_BLOCK_BYTES // (8 * max(1, w)))
    for y in range(0, h, step):
        block = np.asarray(img.crop((0, y, w, min(h, y + step))))
        if mode == "I":
            top = max(int(hi), 1)
            out[y : y + step] = (block.astype(np.float64) * (255.0 / (65535 if top > 255 else 255))).clip(0, 255).astype(np.uint8)
        elif mode == "F":
            a = block.astype(np.float64)
            lo_, hi_ = float(lo), float(hi)
            out[y : y + step] = ((a - lo_) / (hi_ - lo_) * 255.0).astype(np.uint8) if hi_ > lo_ else 0
        else:
            out[y : y + step] = (block.astype(np.uint32) >> 8).astype(np.uint8)
    return Image.fromarray(out, "L").convert("RGB")


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageInfo | None, str | None]:
    """Read the header, without decoding pixels: format, mode, oriented size, frames."""
    img, err = _open(data, max_pixels)
    if err:
        return None, err
    try:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        return ImageInfo(w, h, img.format or "UNKNOWN", img.mode, int(getattr(img, "n_frames", 1))), None
    except Exception as exc:  # noqa: BLE001
        return None, _classify(exc)


def decode_pil(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> tuple[tuple[Image.Image, ImageInfo] | None, str | None]:
    """Decode to an oriented 8-bit RGB PIL image plus the original's info.

    ``min_side``: the consumer needs at least this many pixels on the shorter side, so a
    JPEG may be decoded at a reduced scale that still provides them.
    """
    img, err = _open(data, max_pixels)
    if err:
        return None, err
    try:
        info_mode, fmt, n_frames = img.mode, img.format or "UNKNOWN", int(getattr(img, "n_frames", 1))
        if n_frames > 1:
            img.seek(0)
        orientation = img.getexif().get(0x0112, 1)
        if min_side and fmt == "JPEG":
            w, h = img.size
            scale = max(min_side / min(w, h), 0.0)
            # draft picks the smallest DCT scale whose result is >= the requested size.
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        img = ImageOps.exif_transpose(img) if orientation != 1 else img
        ow, oh = img.size
        rgb = _to_rgb(img)
        # A draft-decoded JPEG reports the reduced size; report the original's oriented size.
        full_w, full_h = Image.open(io.BytesIO(data)).size
        if orientation in (5, 6, 7, 8):
            full_w, full_h = full_h, full_w
        return (rgb, ImageInfo(full_w, full_h, fmt, info_mode, n_frames)), None
    except Exception as exc:  # noqa: BLE001
        return None, _classify(exc)


def resize_for_model(img: Image.Image, size: int, mode: str = "squash") -> np.ndarray:
    """Resize an RGB image to ``size`` x ``size`` uint8.

    ``squash`` keeps the whole picture (aspect distorted), ``center_crop`` keeps aspect
    and cuts the long side, ``pad`` keeps aspect and pads the short side with white.
    """
    if mode == "squash":
        out = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    elif mode == "center_crop":
        out = ImageOps.fit(img, (size, size), Image.BILINEAR)
    elif mode == "pad":
        out = ImageOps.pad(img, (size, size), Image.BILINEAR, color=(255, 255, 255))
    else:
        raise ValueError(f"resize mode must be squash, center_crop or pad, not {mode!r}")
    return np.asarray(out, dtype=np.uint8)


DECODERS = ("pillow", "simplejpeg")


def _decode_turbo(data: bytes, size: int, max_pixels: int) -> Image.Image | None:
    """A plain JPEG through simplejpeg (libjpeg-turbo, DCT-scaled to >= ``size`` on the short
    side), or ``None`` for anything else, which then takes the Pillow path.

    Only the common case is taken: an RGB/greyscale JPEG with no EXIF rotation, within
    ``max_pixels``, that decodes without a libjpeg warning (``strict``). Everything else (a
    CMYK or rotated JPEG, a truncated or corrupt one, other formats) goes through Pillow,
    so the status rows and their reasons are the same as with the Pillow decoder.
    """
    if data is None or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        import simplejpeg

        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or w <= 0 or h <= 0 or w * h > max_pixels:
            return None
        if Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) != 1:
            return None
        scale = size / min(w, h)
        arr = simplejpeg.decode_jpeg(
            data, colorspace="RGB", strict=True, min_height=max(1, int(h * scale + 0.999)), min_width=max(1, int(w * scale + 0.999))
        )
    except Exception:  # noqa: BLE001 - Pillow decides what is wrong with the file
        return None
    return Image.fromarray(arr)


def decode_for_model(
    data: bytes, size: int, resize: str = "squash", max_pixels: int = DEFAULT_MAX_PIXELS, decoder: str = "pillow"
) -> tuple[np.ndarray | None, str | None]:
    """Bytes -> ``(size, size, 3)`` uint8 array, decoding JPEGs at reduced scale.

    ``decoder="simplejpeg"`` decodes plain JPEGs with libjpeg-turbo (1.38x Pillow's
    ``draft`` on 400 x 533 photos, ``extract.json``); other files, and any JPEG it will not
    take, go through Pillow, so bad input gets the same status rows either way.
    """
    if decoder == "simplejpeg":
        fast = _decode_turbo(data, size, max_pixels)
        if fast is not None:
            try:
                return resize_for_model(fast, size, resize), None
            except Exception as exc:  # noqa: BLE001
                return None, _classify(exc)
    decoded, err = decode_pil(data, max_pixels=max_pixels, min_side=size)
    if err:
        return None, err
    try:
        return resize_for_model(decoded[0], size, resize), None
    except Exception as exc:  # noqa: BLE001
        return None, _classify(exc)
