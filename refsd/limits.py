"""The ranges a request's numbers must lie in, checked in one place for the
command line (``refsd generate`` / ``fp16-check``, ``refsd-validate capture``),
``refsd.pipeline.Request`` and a capture bundle's request.

Every refusal names the field and the range. Numbers must be real numbers of
the right kind: a bool or a float where an int belongs (``steps: 2.0``) is
refused, as are NaN and inf.

Image size: each side a positive integer of at most ``MAX_SIDE`` pixels, and
height x width at most :func:`max_image_pixels`, derived from this machine's
physical memory: the float32 pipeline's peak is the VAE decoder at full
resolution, where SD's last up block holds 128-channel float32 activations
(512 bytes per pixel each) and a resnet keeps up to 8 of them alive
(input, two norms, two convs, the skip, the sum, the upsampled copy): about
``BYTES_PER_PIXEL`` = 4 KiB per output pixel. A 512x512 image needs ~1 GiB; on
a 16 GiB machine the bound is 4 Mpixel (2048x2048).
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

STEPS = (1, 1000)  # SD's schedulers are trained on 1000 timesteps; more inference steps than that repeat them
GUIDANCE = (0.0, 1000.0)  # SD is used at 1..20; the capture schema (version 2) allows up to 1000
SEED = (0, 2**64 - 1)  # what numpy's PCG64 seeding takes without folding
MAX_SIDE = 16384
# CLIP reads 77 tokens (a few hundred characters); tokenizing megabytes only to truncate them costs seconds.
MAX_PROMPT_CHARS = 10_000
BYTES_PER_PIXEL = 4096


def max_image_pixels() -> int:
    """height x width bound: physical memory / ``BYTES_PER_PIXEL`` (module docstring)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): assume a 16 GiB machine
        memory = 16 << 30
    return max(memory // BYTES_PER_PIXEL, 64 * 64)


def integer(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def real(value, name: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with ``open_lo``)."""
    rng = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")
    x = float(value)
    if not (math.isfinite(x) and (lo < x if open_lo else lo <= x) and x <= hi):
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")
    return x


def check_text(value, name: str) -> str:
    """A prompt: a str of at most ``MAX_PROMPT_CHARS``, encodable as UTF-8 (a lone surrogate
    from a mis-decoded argv is not)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(value)} characters, over the limit of {MAX_PROMPT_CHARS} (CLIP reads 77 "
                         "tokens)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: not valid Unicode text (lone surrogate at character {e.start})") from None
    return value


def check_request(prompt, negative_prompt, seed, steps, guidance, height, width, *, options: bool = False,
                  prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first field out of range: as a command-line option
    (``--negative-prompt``) with ``options``, else as ``prefix`` + the field name."""
    def n(field: str) -> str:
        return "--" + field.replace("_", "-") if options else prefix + field

    check_text(prompt, n("prompt"))
    check_text(negative_prompt, n("negative_prompt"))
    integer(seed, n("seed"), *SEED)
    integer(steps, n("steps"), *STEPS)
    real(guidance, n("guidance"), *GUIDANCE)
    check_image_size(height, width, n("height"), n("width"))


def check_image_size(height, width, height_name: str = "--height", width_name: str = "--width") -> None:
    """Each side in [1, ``MAX_SIDE``], height x width within this machine's bound."""
    integer(height, height_name, 1, MAX_SIDE)
    integer(width, width_name, 1, MAX_SIDE)
    if height * width > max_image_pixels():
        raise ValueError(f"{height_name} x {width_name} = {height}x{width} is over this machine's bound of "
                         f"{max_image_pixels()} pixels (physical memory / {BYTES_PER_PIXEL} bytes per pixel)")
