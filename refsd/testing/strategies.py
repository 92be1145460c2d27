"""Hypothesis strategies for op inputs: small, bounded, fp16-representable.

Every array is ``float32`` holding values that are exactly representable in
float16, so the same inputs mean the same thing in every precision mode (the
fp16-storage modes' input rounding is a no-op on them) and a difference between
an op and its rewrite comes from the computation, never from the inputs.

Shapes are capped (batch <= 2, spatial <= 8, channels <= 16 by default) so an
example runs in milliseconds; magnitudes are bounded (``|x| <= 4`` for
activations, ``|w| <= 1`` for weights by default) so no intermediate of the
original ops approaches fp16's 65504 and the rounding-error budgets of
``refsd.testing.rounding_budgets`` apply. Every bound is a parameter.

Element strategies and arrays::

    fp16_values(min_value=-4.0, max_value=4.0, allow_subnormal=False)
    fp16_arrays(shape, *, min_value=-4.0, max_value=4.0, allow_subnormal=False)
    nhwc_shapes(max_batch=2, max_hw=8, channels=st.integers(1, 16), *, min_hw=1)

Parameter sets, tuples ready to call an op and its rewrite with
(``op(*arrays, **attrs)``)::

    conv_inputs(...)        -> (x, w, b, {"stride", "padding"})          conv2d
    serial_conv_inputs(...) -> (x, w, b, {"factor", "axis", "stride", "padding"})  serial_conv
    winograd_inputs(...)    -> (x, w, b, {"padding"})                    conv2d / conv2d_winograd
    linear_inputs(...)      -> (x, w, b)                                 linear / fc_as_conv
    group_norm_inputs(...)  -> (x, gamma, beta, {"num_groups", "eps"})   group_norm and rewrites
    attention_inputs(...)   -> (q, k, v, {"heads"[, "mask"]})            attention and rewrites
    gelu_inputs(...)        -> (x,)                                      gelu / gelu_clip / gelu_fused
    geglu_inputs(...)       -> (h,)                                      geglu and rewrites

``b`` is ``None`` or an array (drawn unless ``bias=True/False`` is given).

Note on the element distribution: ``hypothesis.extra.numpy.arrays`` fills an
array with one drawn value and then draws a sparse subset of elements
individually, so arrays often hold many equal values. That shrinks well and is
a fair test of rewrites (which must agree on *every* input), but degenerate
cases it produces (constant GroupNorm groups) are ruled out explicitly where
they would make the original op ill-conditioned.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refsd.numerics import FP16_MAX, FP16_MIN_NORMAL

_MIN_NORMAL = float(FP16_MIN_NORMAL)

__all__ = [
    "attention_inputs", "conv_inputs", "embedding_inputs", "fp16_arrays", "fp16_values", "geglu_inputs", "gelu_inputs",
    "group_norm_inputs", "linear_inputs", "nhwc_shapes", "serial_conv_inputs", "winograd_inputs",
]


# ---------------------------------------------------------------- helpers


def _fp16_inward(value: float, *, up: bool) -> float:
    """The fp16 value nearest ``value`` on the inside of a bound (up for a lower
    bound, down for an upper one), so any float works as a bound (Hypothesis'
    width=16 floats need exact ones). Beyond +-65504 a bound is clamped to the
    finite range, or is +-inf where no fp16 value lies inside it."""
    v = float(value)
    if v >= FP16_MAX:
        return FP16_MAX if (not up or v == FP16_MAX) else math.inf
    if v <= -FP16_MAX:
        return -FP16_MAX if (up or v == -FP16_MAX) else -math.inf
    h = np.float16(v)
    if up and float(h) < v:
        h = np.nextafter(h, np.float16(np.inf))
    elif not up and float(h) > v:
        h = np.nextafter(h, np.float16(-np.inf))
    return float(h)


def _choices(value, name: str) -> tuple[int, ...]:
    """An int or an iterable of ints -> a non-empty tuple of ints."""
    vals = (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if not vals:
        raise ValueError(f"{name}: need at least one choice")
    return vals


def _ints(value, lo: int, hi: int | None = None) -> st.SearchStrategy[int]:
    """A strategy given as such, or an int (fixed), or ``integers(lo, hi)``."""
    if isinstance(value, st.SearchStrategy):
        return value
    if value is None:
        return st.integers(lo, hi)
    return st.just(int(value))


def _bias(draw, bias: bool | None, n: int, bound: float) -> np.ndarray | None:
    has = draw(st.booleans()) if bias is None else bool(bias)
    return draw(fp16_arrays((n,), min_value=-bound, max_value=bound)) if has else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------- elements, arrays, shapes


def fp16_values(min_value: float = -4.0, max_value: float = 4.0, allow_subnormal: bool = False
                ) -> st.SearchStrategy[float]:
    """Python floats exactly representable in float16, in ``[min_value, max_value]``.

    Bounds need not be fp16 values: they are moved inward to the nearest fp16
    value (and clamped to +-65504); an interval holding no fp16 value is a
    ``ValueError``. No NaN or inf. fp16 subnormals
    (``0 < |x| < 2**-14``) only with ``allow_subnormal=True``; they flush to zero
    on FTZ hardware, so they are opt-in.
    """
    lo, hi = _fp16_inward(min_value, up=True), _fp16_inward(max_value, up=False)
    if not lo <= hi:
        raise ValueError(f"fp16_values: no fp16 value in [{min_value}, {max_value}]")
    if not allow_subnormal:  # a bound inside the subnormal band moves out of it, onto 2**-14 or 0
        if 0 < lo < _MIN_NORMAL:
            lo = _MIN_NORMAL
        if -_MIN_NORMAL < hi < 0:
            hi = -_MIN_NORMAL
        if -_MIN_NORMAL < lo < 0:
            lo = -0.0 if hi >= 0 else lo
        if 0 < hi < _MIN_NORMAL:
            hi = 0.0 if lo <= 0 else hi
        if not lo <= hi:
            raise ValueError(f"fp16_values: no normal fp16 value or zero in [{min_value}, {max_value}]")
    # Hypothesis rejects allow_subnormal=True for a range that holds no subnormal: here it means "may".
    allow_sub = bool(allow_subnormal) and lo < _MIN_NORMAL and hi > -_MIN_NORMAL
    values = st.floats(lo, hi, width=16, allow_nan=False, allow_infinity=False, allow_subnormal=allow_sub)
    if allow_subnormal:
        return values
    # Hypothesis 6.170 can still draw fp16 subnormals with allow_subnormal=False at width=16
    # (e.g. -5.126e-06 in [-5.1e-06, 0]); never let one through.
    return values.filter(lambda v: v == 0 or abs(v) >= _MIN_NORMAL)


def fp16_arrays(shape, *, min_value: float = -4.0, max_value: float = 4.0, allow_subnormal: bool = False
                ) -> st.SearchStrategy[np.ndarray]:
    """``float32`` arrays whose every element is an fp16 value in
    ``[min_value, max_value]`` (see ``fp16_values``).

    ``shape`` is an int, a tuple, or a strategy of shapes. Drawn as a float16
    array (``hypothesis.extra.numpy.arrays`` with width-16 float elements) and
    converted exactly to float32, the dtype every op takes.
    """
    elements = fp16_values(min_value, max_value, allow_subnormal)
    return hnp.arrays(np.float16, shape, elements=elements).map(lambda a: a.astype(np.float32))


def nhwc_shapes(max_batch: int = 2, max_hw: int = 8, channels=st.integers(1, 16), *, min_hw: int = 1
                ) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """``(N, H, W, C)`` activation shapes: ``1 <= N <= max_batch``,
    ``min_hw <= H, W <= max_hw``, ``C`` from ``channels`` (a strategy or an int)."""
    if max_hw < min_hw:
        raise ValueError(f"nhwc_shapes: max_hw={max_hw} < min_hw={min_hw}")
    return st.tuples(st.integers(1, max_batch), st.integers(min_hw, max_hw), st.integers(min_hw, max_hw),
                     _ints(channels, 1, 16))


# ---------------------------------------------------------------- convolutions


@st.composite
def _conv(draw, kernel, stride, cin_st, cout_st, max_batch, max_hw, max_abs, w_max_abs, bias, asymmetric_padding,
          padding=None):
    k = draw(st.sampled_from(_choices(kernel, "kernel")))
    s = draw(st.sampled_from(_choices(stride, "stride")))
    if padding is None:
        pad_st = st.integers(0, k // 2)
    else:
        pad_st = st.sampled_from(_choices(padding, "padding"))
    if asymmetric_padding:
        (pt, pb), (pl, pr) = (draw(pad_st), draw(pad_st)), (draw(pad_st), draw(pad_st))
        pad = ((pt, pb), (pl, pr))
    else:
        pt = pb = pl = pr = draw(pad_st)
        pad = pt
    # The padded input must hold at least one kernel window.
    h = draw(st.integers(max(1, k - pt - pb), max(max_hw, k - pt - pb)))
    w_ = draw(st.integers(max(1, k - pl - pr), max(max_hw, k - pl - pr)))
    n = draw(st.integers(1, max_batch))
    cin, cout = draw(cin_st), draw(cout_st)
    x = draw(fp16_arrays((n, h, w_, cin), min_value=-max_abs, max_value=max_abs))
    w = draw(fp16_arrays((k, k, cin, cout), min_value=-w_max_abs, max_value=w_max_abs))
    b = _bias(draw, bias, cout, w_max_abs)
    return x, w, b, {"stride": s, "padding": pad}


def conv_inputs(kernel=(1, 3), stride=(1, 2), max_channels: int = 16, *, max_batch: int = 2, max_hw: int = 8,
                max_abs: float = 4.0, w_max_abs: float = 1.0, bias: bool | None = None,
                asymmetric_padding: bool = False) -> st.SearchStrategy[tuple]:
    """``(x, w, b, {"stride": s, "padding": p})`` for ``conv2d``.

    ``x`` NHWC in ``[-max_abs, max_abs]``; ``w`` HWIO ``(k, k, Cin, Cout)`` in
    ``[-w_max_abs, w_max_abs]`` with ``k`` from ``kernel`` and ``s`` from
    ``stride`` (an int or a collection of choices); ``Cin, Cout <= max_channels``;
    ``b`` of shape ``(Cout,)`` or ``None``. Padding is ``0 .. k // 2`` (an int, or
    ``((top, bottom), (left, right))`` with ``asymmetric_padding=True``), and the
    input is at least one window large, so the output is never empty.
    With the defaults the conv has at most ``K = 9 * 16 = 144`` terms per output.
    """
    ch = st.integers(1, max_channels)
    return _conv(kernel, stride, ch, ch, max_batch, max_hw, max_abs, w_max_abs, bias, asymmetric_padding)


@st.composite
def serial_conv_inputs(draw, axis: str | None = None, max_factor: int = 4, kernel=(1, 3), stride=(1, 2),
                       max_channels: int = 16, *, max_batch: int = 2, max_hw: int = 8, max_abs: float = 4.0,
                       w_max_abs: float = 1.0, bias: bool | None = None, asymmetric_padding: bool = False):
    """``(x, w, b, {"factor", "axis", "stride", "padding"})`` for ``serial_conv``;
    pop ``factor`` and ``axis`` to call ``conv2d`` on the same arrays.

    ``axis`` is ``"input"``, ``"output"`` or ``None`` (drawn). The split channel
    count is ``factor * c`` with ``1 <= factor <= max_factor`` and at most
    ``max_channels`` channels, so ``factor`` always divides it. Other parameters
    as ``conv_inputs``.
    """
    ax = draw(st.sampled_from(("input", "output"))) if axis is None else axis
    if ax not in ("input", "output"):
        raise ValueError(f"serial_conv_inputs: axis must be 'input', 'output' or None, got {axis!r}")
    factor = draw(st.integers(1, max(1, min(max_factor, max_channels))))
    per_part = draw(st.integers(1, max(1, max_channels // factor)))
    split = st.just(factor * per_part)
    other = st.integers(1, max_channels)
    cin_st, cout_st = (split, other) if ax == "input" else (other, split)
    x, w, b, attrs = draw(_conv(kernel, stride, cin_st, cout_st, max_batch, max_hw, max_abs, w_max_abs, bias,
                                asymmetric_padding))
    return x, w, b, {"factor": factor, "axis": ax, **attrs}


def winograd_inputs(max_channels: int = 16, *, padding=(0, 1), max_batch: int = 2, max_hw: int = 8,
                    max_abs: float = 4.0, w_max_abs: float = 1.0, bias: bool | None = None
                    ) -> st.SearchStrategy[tuple]:
    """``(x, w, b, {"padding": p})`` for a 3x3 stride-1 convolution: both
    ``conv2d(x, w, b, **attrs)`` and ``conv2d_winograd(x, w, b, **attrs, tile=t)``.
    ``p`` is drawn from ``padding`` (0 or 1); spatial sizes include ones that are
    not a multiple of the Winograd tile (partial tiles). Other parameters as
    ``conv_inputs``."""
    ch = st.integers(1, max_channels)
    return _conv(3, 1, ch, ch, max_batch, max_hw, max_abs, w_max_abs, bias, False, padding=padding).map(
        lambda t: (t[0], t[1], t[2], {"padding": t[3]["padding"]}))


# ---------------------------------------------------------------- linear


@st.composite
def linear_inputs(draw, max_batch: int = 2, max_len: int = 8, max_features: int = 16, *, max_abs: float = 4.0,
                  w_max_abs: float = 1.0, bias: bool | None = None):
    """``(x, w, b)`` for ``linear`` / ``fc_as_conv``: ``x`` of shape ``(N, L, C)``
    in ``[-max_abs, max_abs]``, ``w`` of shape ``(out, C)`` (PyTorch's layout)
    in ``[-w_max_abs, w_max_abs]``, ``b`` of shape ``(out,)`` or ``None``;
    ``N <= max_batch``, ``L <= max_len``, ``C, out <= max_features``."""
    n, length = draw(st.integers(1, max_batch)), draw(st.integers(1, max_len))
    c, out = draw(st.integers(1, max_features)), draw(st.integers(1, max_features))
    x = draw(fp16_arrays((n, length, c), min_value=-max_abs, max_value=max_abs))
    w = draw(fp16_arrays((out, c), min_value=-w_max_abs, max_value=w_max_abs))
    return x, w, _bias(draw, bias, out, w_max_abs)


# ---------------------------------------------------------------- normalization


@st.composite
def group_norm_inputs(draw, max_batch: int = 2, max_hw: int = 8, max_channels: int = 16, *, min_std: float = 0.25,
                      max_abs: float = 4.0, affine_max_abs: float = 2.0, eps: float = 1e-5, affine: bool = True):
    """``(x, gamma, beta, {"num_groups": G, "eps": eps})`` for ``group_norm`` and
    its rewrites, with ``G`` a divisor of ``C`` and every group holding at least
    two elements.

    **Conditioning bound.** Every group of every sample has a (population)
    standard deviation of at least ``min_std``: a group drawn with a smaller
    spread gets an alternating ``+-3 min_std`` pattern added (then rounded to
    fp16). Since the normalization divides by the group's std, rounding errors in
    the statistics are amplified by ``kappa = mean|x_g| / std_g``; here
    ``kappa <= (max_abs + 3 min_std) / min_std`` (20 with the defaults), so the
    op is well-conditioned and its error bounded. Values lie in
    ``[-(max_abs + 3 min_std), max_abs + 3 min_std]``; the guarantee needs
    ``min_std >= max_abs / 1000`` (else fp16 rounding of the pattern could eat
    it). ``gamma``, ``beta`` in ``[-affine_max_abs, affine_max_abs]``, or both
    ``None`` with ``affine=False``.
    """
    if not min_std >= max_abs / 1000:
        raise ValueError(f"group_norm_inputs: min_std={min_std} must be >= max_abs / 1000 = {max_abs / 1000}")
    n, h, w, _ = draw(nhwc_shapes(max_batch, max_hw, 1))
    c = draw(st.integers(2 if h * w == 1 else 1, max_channels))
    groups = draw(st.sampled_from([g for g in _divisors(c) if h * w * (c // g) >= 2]))
    x = draw(fp16_arrays((n, h, w, c), min_value=-max_abs, max_value=max_abs))
    xg = x.astype(np.float64).reshape(n, h * w, groups, c // groups).transpose(0, 2, 1, 3).reshape(n, groups, -1)
    low = xg.std(axis=-1) < min_std
    if low.any():
        size = xg.shape[-1]
        pattern = 3.0 * min_std * np.where(np.arange(size) % 2 == 0, 1.0, -1.0)
        xg = np.where(low[..., None], xg + pattern, xg)
        xg = xg.astype(np.float16).astype(np.float64)
        x = xg.reshape(n, groups, h * w, c // groups).transpose(0, 2, 1, 3).reshape(n, h, w, c).astype(np.float32)
    # Holds by the bound above (std(x + p) >= std(p) - std(x) >= 1.6 min_std before rounding); kept as a check.
    assume(bool((xg.std(axis=-1) >= min_std).all()))
    if affine:
        gamma = draw(fp16_arrays((c,), min_value=-affine_max_abs, max_value=affine_max_abs))
        beta = draw(fp16_arrays((c,), min_value=-affine_max_abs, max_value=affine_max_abs))
    else:
        gamma = beta = None
    return x, gamma, beta, {"num_groups": groups, "eps": eps}


# ---------------------------------------------------------------- attention


@st.composite
def attention_inputs(draw, cross: bool | None = None, masked: bool | None = None, *, max_batch: int = 2,
                     max_len: int = 8, max_heads: int = 2, min_head_dim: int = 1, max_head_dim: int = 8,
                     max_abs: float = 2.0, v_max_abs: float = 4.0, mask_value: float = -10000.0,
                     allow_fully_masked: bool = False):
    """``(q, k, v, {"heads": H[, "mask": m]})`` for ``attention`` and its rewrites.

    ``q`` ``(N, Lq, H*D)``, ``k`` ``(N, Lk, H*D)``, ``v`` ``(N, Lk, H*Dv)``;
    self-attention has ``Lk == Lq``, cross-attention (``cross=True``) a different
    key length (needs ``max_len >= 2``); ``None`` draws either. ``q``, ``k`` in
    ``[-max_abs, max_abs]`` so scores stay below ``max_abs**2 sqrt(D)``; ``v`` in
    ``[-v_max_abs, v_max_abs]``.

    The mask (``masked=True``, or drawn with ``None``) is additive, float32,
    holding ``0`` (keep) or ``mask_value`` (drop), broadcastable to
    ``(N, H, Lq, Lk)``: per query ``(N, 1, Lq, Lk)`` or key padding
    ``(N, 1, 1, Lk)``. ``mask_value`` must be finite and exactly representable
    in fp16 (-10000 is; -1e9 becomes -inf in fp16 storage, which is a different
    test). Every query row keeps at least one key unless
    ``allow_fully_masked=True``.
    """
    if not (np.isfinite(mask_value) and float(np.float16(mask_value)) == float(mask_value)):
        raise ValueError(f"attention_inputs: mask_value={mask_value!r} is not a finite fp16 value")
    n = draw(st.integers(1, max_batch))
    heads = draw(st.integers(1, max_heads))
    d = draw(st.integers(min_head_dim, max_head_dim))
    dv = draw(st.one_of(st.just(d), st.integers(1, max_head_dim)))
    lq = draw(st.integers(1, max_len))
    is_cross = draw(st.booleans()) if cross is None else bool(cross)
    if is_cross:
        if max_len < 2:
            raise ValueError("attention_inputs: cross-attention needs max_len >= 2 (Lk != Lq)")
        lk = draw(st.integers(1, max_len).filter(lambda m: m != lq))
    else:
        lk = lq
    q = draw(fp16_arrays((n, lq, heads * d), min_value=-max_abs, max_value=max_abs))
    k = draw(fp16_arrays((n, lk, heads * d), min_value=-max_abs, max_value=max_abs))
    v = draw(fp16_arrays((n, lk, heads * dv), min_value=-v_max_abs, max_value=v_max_abs))
    attrs: dict = {"heads": heads}
    if draw(st.booleans()) if masked is None else masked:
        rows = draw(st.sampled_from((lq, 1)))
        drop = draw(hnp.arrays(np.bool_, (n, 1, rows, lk)))
        if not allow_fully_masked:
            full = drop.all(axis=-1)  # (n, 1, rows)
            if full.any():
                keep = draw(st.integers(0, lk - 1))
                drop[full, keep] = False
        attrs["mask"] = np.where(drop, np.float32(mask_value), np.float32(0)).astype(np.float32)
    return q, k, v, attrs


# ---------------------------------------------------------------- activations


def gelu_inputs(max_abs: float = 4.0, *, shape=None, allow_subnormal: bool = False) -> st.SearchStrategy[tuple]:
    """``(x,)`` for ``gelu`` and its rewrites: fp16 values in ``[-max_abs, max_abs]``
    of any shape of rank 1 to 3 with sides <= 8 (or ``shape``). ``max_abs`` above
    40.3 reaches the range where unfused fp16 ``x**3`` overflows."""
    shape = hnp.array_shapes(min_dims=1, max_dims=3, max_side=8) if shape is None else shape
    return fp16_arrays(shape, min_value=-max_abs, max_value=max_abs, allow_subnormal=allow_subnormal).map(
        lambda x: (x,))


def geglu_inputs(max_abs: float = 4.0, *, max_len: int = 8, max_features: int = 16) -> st.SearchStrategy[tuple]:
    """``(h,)`` for ``geglu`` and its rewrites: ``h`` of shape ``(N, L, 2F)`` (value
    half, gate half) in ``[-max_abs, max_abs]``, ``N <= 2``, ``L <= max_len``,
    ``F <= max_features``."""
    shapes = st.tuples(st.integers(1, 2), st.integers(1, max_len), st.integers(1, max_features).map(lambda f: 2 * f))
    return fp16_arrays(shapes, min_value=-max_abs, max_value=max_abs).map(lambda h: (h,))


# ---------------------------------------------------------------- embedding


@st.composite
def embedding_inputs(draw, max_rows: int = 16, max_dim: int = 8, *, max_abs: float = 4.0):
    """``(ids, table)`` for ``embedding`` / ``embedding_1d``: ``table`` of shape
    ``(V, D)``, ``V <= max_rows``, ``D <= max_dim``, fp16 values in
    ``[-max_abs, max_abs]``; ``ids`` int32 in ``[0, V)`` of any shape of rank 1 to
    3 with sides <= 8 (the text encoder's is (N, L))."""
    rows, dim = draw(st.integers(1, max_rows)), draw(st.integers(1, max_dim))
    table = draw(fp16_arrays((rows, dim), min_value=-max_abs, max_value=max_abs))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=8))
    ids = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, rows - 1)))
    return ids, table
