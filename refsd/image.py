"""Images: decoder output to pixels, the comparison picture, and a minimal
PNG writer (8-bit RGB), so refsd needs no imaging library.

Images are (H, W, 3) float arrays in [0, 1] unless said otherwise."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np


def to_image(decoded: np.ndarray) -> np.ndarray:
    """Decoder output (about [-1, 1]) -> [0, 1], as diffusers' ``postprocess``."""
    return np.clip(decoded / np.float32(2) + np.float32(0.5), 0.0, 1.0)


def psnr(ref: np.ndarray, test: np.ndarray, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range**2 / MSE)`` in dB of two
    arrays of one shape: ``inf`` for identical ones, NaN if either holds a non-finite value."""
    x, y = np.asarray(ref, dtype=np.float64), np.asarray(test, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    mse = float(np.mean((x - y) ** 2)) if x.size else 0.0
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def heatmap(err: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> RGB, black -> red -> yellow -> white."""
    e = np.clip(err, 0.0, 1.0)[..., None]
    return np.concatenate([np.clip(3 * e, 0, 1), np.clip(3 * e - 1, 0, 1), np.clip(3 * e - 2, 0, 1)], axis=-1)


def side_by_side(ref: np.ndarray, test: np.ndarray, *, scale: int = 4) -> tuple[np.ndarray, float]:
    """ref | test | amplified |ref - test| heatmap, each upscaled ``scale``x
    (nearest) so a tiny image is visible; returns the picture and the gain.
    NaN / inf pixels of ``test`` are shown magenta."""
    bad = ~np.isfinite(test).all(axis=-1)
    err = np.where(bad, 0.0, np.abs(ref - np.nan_to_num(test)).max(axis=-1))
    peak = float(err.max())
    gain = 1.0 / peak if peak > 0 else 1.0
    magenta = np.array([1.0, 0.0, 1.0], np.float32)
    test = np.where(bad[..., None], magenta, test)
    diff = np.where(bad[..., None], magenta, heatmap(err * gain))
    sep = np.ones((ref.shape[0], 2, 3), np.float32)
    row = np.concatenate([ref, sep, test, sep, diff], axis=1)
    return np.repeat(np.repeat(row, scale, axis=0), scale, axis=1), gain


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """``image``: (H, W, 3) floats in [0, 1] (clipped) or uint8."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.round(np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.write_bytes(encode_png(image))
    return path
