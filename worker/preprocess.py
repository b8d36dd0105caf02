"""Stage: decode and resize, off the event loop (Pillow releases the GIL while it works).

The GPU must never wait for the CPU: images are brought to the model's pixel budget here,
before the engine sees them (vLLM resizing them itself left an H100 idle 41% of the time,
see docs/performance.md). JPEGs decode at reduced scale (draft mode) when they are much
larger than the budget, which is most of the saving.
"""

from __future__ import annotations

import io
import math
import os
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError, _imaging

from vlmq.schemas.errors import ErrorCode, VlmqError, describe

_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
# Bytes Pillow stores per pixel where it is not 4.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}

# Pillow allocates an image in blocks (16 MB by default). Once glibc has freed one large
# block its mmap threshold rises (up to 32 MB), and later blocks come from its heap, where
# freed ones stay in the process between smaller live allocations: a flood of 64-megapixel
# decodes one at a time grew a worker by ~600 MB under a 400 MB decode budget. Blocks over
# 32 MB are always mapped on their own and given back when freed (the same flood: +420-466
# MB). Small images fit in one block of their own size either way.
_BLOCK_BYTES = 64 * 1024 * 1024
if "PILLOW_BLOCK_SIZE" not in os.environ:  # an operator's own choice stands
    _imaging.set_block_size(_BLOCK_BYTES)

try:  # HEIC/HEIF (phone photos): Pillow has no decoder of its own; AVIF it has.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # installed without the worker extra: a worker naming HEIF stops at start
    pass


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's rule: sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    h, w = max(h, 1), max(w, 1)
    if max(h, w) / min(h, w) > 200:  # Qwen rejects extreme ratios; clamp instead
        h, w = (h, max(h // 200, 1)) if h > w else (max(w // 200, 1), w)
    h_bar = max(factor, round(h / factor) * factor)
    w_bar = max(factor, round(w / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar = math.ceil(h * beta / factor) * factor
        w_bar = math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


def unknown_formats(formats: list[str]) -> list[str]:
    """The names in `formats` that no Pillow plugin here opens."""
    Image.init()
    return [f for f in formats if f.upper() not in Image.OPEN]


def load_image(
    data: bytes,
    *,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    max_image_pixels: int,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Bytes -> RGB image resized to the budget, or VlmqError(IMAGE_CORRUPT/IMAGE_TOO_LARGE).

    Only `formats` (Pillow's names; None: every format Pillow knows) are opened. Whatever a
    decoder raises, from any plugin, is this image's fault: `image_corrupt`."""
    if not data:
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, "empty image (0 bytes)")
    too_large = f"more pixels than max_image_pixels {max_image_pixels}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            w, h = img.size
            if w * h > max_image_pixels:  # from the header, before any pixel is decoded
                raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, f"{w}x{h}: {too_large}")
            return _to_rgb_resized(img, factor, min_pixels, max_pixels)
    except VlmqError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VlmqError(ErrorCode.IMAGE_TOO_LARGE, too_large) from None
    except UnidentifiedImageError:
        allowed = ", ".join(formats) if formats else "any Pillow format"
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, f"not an image of an allowed format ({allowed})") from None
    except Exception as exc:  # truncated data, bad headers, a plugin's own exception types
        raise VlmqError(ErrorCode.IMAGE_CORRUPT, f"cannot decode image: {describe(exc, 300)}") from None


def decode_bytes(
    data: bytes,
    *,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    max_image_pixels: int,
    formats: tuple[str, ...] | None = None,
) -> int:
    """Bytes `load_image` will hold at its peak for these bytes, from the header alone (no
    pixel is decoded): the full-size decode, not the resized result, is what a 62 KB PNG of
    64 megapixels costs. 0 when the header cannot be read or is over `max_image_pixels`:
    `load_image` then refuses it before decoding anything."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=formats)
            if img.size[0] * img.size[1] > max_image_pixels:
                return 0
            orientation, _ = _plan(img, factor, min_pixels, max_pixels, probing=True)
            w, h = img.size  # after draft: a JPEG's reduced decode size
            return _peak_bytes(w * h, img.mode, "transparency" in img.info, orientation != 1)
    except Exception:  # whatever a plugin raises on a bad header
        return 0


def _peak_bytes(pixels: int, mode: str, transparency: bool, rotated: bool) -> int:
    """The decoded image, plus each full-size copy `_to_rgb_resized` may make while the
    decoded one is still held: rotated, converted to RGB(A), flattened onto white (with its
    alpha mask), and the resize's reduced intermediate (at most a quarter of the pixels).
    Pillow keeps multi-band pixels in 4 bytes, RGB too. Within 10-20% above the peak RSS
    measured for 64-megapixel PNGs of each mode."""
    stored = _STORED_BYTES.get(mode, 4)
    alpha = mode in _ALPHA or transparency
    converted = mode not in ("RGB", "RGBA")
    return pixels * (stored * (1 + rotated) + 4 * converted + 5 * alpha + 1)


def _plan(
    img: Image.Image, factor: int, min_pixels: int, max_pixels: int, *, probing: bool = False
) -> tuple[int, tuple[int, int]]:
    """(EXIF orientation, target (width, height)); a JPEG is set to decode at the smallest
    DCT scale still at least the target size (its `size` shrinks to that at once)."""
    w, h = img.size
    # A PNG's EXIF may follow its pixels: reading it would decode them, which a probe must not.
    unread = probing and img.format == "PNG" and "exif" not in img.info
    orientation = 1 if unread else img.getexif().get(0x0112, 1)
    disp_h, disp_w = (w, h) if orientation in _ROTATED else (h, w)
    th, tw = smart_resize(disp_h, disp_w, factor, min_pixels, max_pixels)
    if img.format == "JPEG":
        img.draft("RGB", (th, tw) if orientation in _ROTATED else (tw, th))
    return orientation, (tw, th)


def _to_rgb_resized(img: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    _, (tw, th) = _plan(img, factor, min_pixels, max_pixels)
    img.seek(0)  # animated GIF/WebP: the first frame
    img.load()
    img = ImageOps.exif_transpose(img) or img
    img = _rgb(img)
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return img


def _rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency is flattened onto white (as a viewer shows it)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # no full-size copy of itself
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")
