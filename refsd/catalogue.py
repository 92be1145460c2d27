"""The float16 exception catalogue: known ways Stable Diffusion breaks in fp16,
each a small deterministic computation through the public ops, with a
"broken" variant the monitor must flag and a "fixed" variant it must not.

A case runs under a module path ``catalogue.<case>.<module>`` (the same kind
of path a real model reports, e.g. ``unet.mid_block.attentions.0...ff``) and
a precision mode. It is *detected* when the broken run's first offending
(severe) event has the expected kind, path, op and primitive, and every other
expected kind was also reported; its fix is *clean* when the fixed run has no
severe event and a finite output.

Cases:

``gelu_tanh``
    Unfused tanh-GELU in ``f16``: ``x**3`` overflows fp16 for ``|x| >= 40.3``
    (41**3 = 68921 > 65504): overflow at primitive ``pow3``. In this emulation
    ``tanh(inf) = 1`` saves the output, but the inf is real, and a GPU tanh
    written as ``(e^2x - 1) / (e^2x + 1)`` turns it into inf/inf = NaN.
    Fix: ``gelu_clip`` with M = 10 (Choi et al. 2023): tanh has saturated long
    before 10, and 10**3 cannot overflow.
``group_norm_sum_squares``
    GroupNorm in ``f16`` over 64x64x10 = 40960 elements per group of values
    ~N(0, 2^2): the blocked fp16 sum of squares reaches ~164000 and overflows
    at primitive ``sum.accumulate``; var = inf, rsqrt = 0 and the group's
    output silently collapses to beta. Fix: the same op in ``f32_f16`` (fp16
    storage, fp32 accumulation inside the op, which is what a fused GroupNorm
    kernel does).
``eps_ftz``
    GroupNorm with ``eps=1e-5`` in ``f16`` on flush-to-zero hardware and a
    constant group: 1e-5 is an fp16 subnormal, flushes to 0 (``constant``
    event at primitive ``eps``), var + eps = 0, rsqrt(0) = inf, 0 * inf = NaN
    (``invalid``). Fix: ``eps=1e-3`` on the same FTZ precision. Turning FTZ
    off also avoids it (eps then survives as a subnormal, a non-severe
    warning) but FTZ is a property of the phone's GPU, not a choice; 1e-3 is
    a normal fp16 number, and for groups with variance >= 1 it changes
    ``1/sqrt(var + eps)`` by at most 5e-4 relative, about one fp16 rounding.
``mask_neg_1e9``
    Attention with an additive key-padding mask of -1e9 in ``f32_f16``: the
    mask becomes -inf as an fp16 tensor (``constant`` event at primitive
    ``mask``); a fully masked row (a batch item whose keys are all padding)
    is then all -inf and softmax gives -inf - (-inf) = NaN (``invalid``).
    Fix: a mask of -1e4. Then a fully masked row stays finite: scores near 0
    plus -1e4 all round to -10000 (fp16 spacing there is 8), so its softmax is
    uniform and the row's output is the mean of V. -65504 is *not* a safe
    fix: any score <= -16 added to it rounds to -inf in fp16.
``scores_overflow``
    Attention in ``f32_f16`` with large, aligned activations (|q|, |k| in
    [92, 100], head dim 64): ``QK^T / 8`` is about 70000 and the scores
    tensor overflows fp16 at primitive ``scores``. (In ``f16`` the blocked
    matmul would overflow first, at ``matmul.partial``.) Fix:
    ``upcast_attention=True`` (scores and softmax in float32, as diffusers does
    for SD 2.x); only the probabilities are stored as fp16.

On real kernels (LiteRT's GPU accelerator in fp16, each variant exported as a
small .tflite by ``bench/gpu_probes.py``; ``Case.litert_gpu`` records what
happened and why): ``mask_neg_1e9`` and ``scores_overflow`` break there too;
``gelu_tanh``, ``group_norm_sum_squares`` and ``eps_ftz`` do not, because the
converter fuses that GELU into one kernel, MEAN keeps float32 sums, and this
GPU keeps subnormals; ``upcast_attention`` is no fix there (the exported graph
has no per-op precision; fp32 kernels are). ``run_on_device(case)`` replays
both variants under the ``litert-gpu`` device model, which agrees with every
recorded outcome (tests/test_gpu_emulation.py).

``run_catalogue()`` runs them all; ``CatalogueResult.table()`` and
``.to_json()`` render the outcome, and ``refsd catalogue`` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from refsd import ops
from refsd.context import scope
from refsd.monitor import Event, Report, monitoring
from refsd.numerics import Precision, precision

__all__ = ["CASES", "Case", "CaseResult", "CatalogueResult", "DeviceOutcome", "Variant", "run_case", "run_catalogue",
           "run_on_device"]


@dataclass(frozen=True)
class Variant:
    """One way of running a case: a computation and its precision mode."""

    description: str
    precision: Precision
    fn: Callable[[], np.ndarray]


@dataclass(frozen=True)
class DeviceOutcome:
    """What a case's two variants did on a device's real fp16 kernels."""

    broken_finite: bool  # the broken variant's output had no inf / NaN there
    fixed_finite: bool
    why: str  # where and why it differs from the generic f16 story


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    module: str  # last component(s) of the path, e.g. "ff"
    expected_kind: str  # of the first offending event
    expected_op: str
    expected_primitive: str
    broken: Variant
    fixed: Variant
    also_expected: tuple[str, ...] = ()  # other event kinds the broken run must report
    litert_gpu: DeviceOutcome | None = None  # measured on LiteRT's GPU accelerator, fp16 kernels

    @property
    def path(self) -> str:
        return f"catalogue.{self.name}.{self.module}"


@dataclass
class CaseResult:
    case: Case
    broken_report: Report
    fixed_report: Report
    broken_finite: bool
    fixed_finite: bool
    missing: tuple[str, ...] = field(default=())  # expected kinds not reported

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def first(self) -> Event | None:
        """The broken run's first offending event (None if it had no severe event)."""
        e = self.broken_report.first
        return e if e is not None and e.severe else None

    @property
    def detected(self) -> bool:
        e, c = self.first, self.case
        return (
            e is not None and e.kind == c.expected_kind and e.path == c.path and e.op == c.expected_op
            and e.primitive == c.expected_primitive and not self.missing
        )

    @property
    def fixed_clean(self) -> bool:
        return self.fixed_report.clean and self.fixed_finite

    @property
    def ok(self) -> bool:
        return self.detected and self.fixed_clean

    def to_dict(self) -> dict:
        c = self.case
        return {
            "case": c.name,
            "title": c.title,
            "expected": {
                "kind": c.expected_kind, "path": c.path, "op": c.expected_op, "primitive": c.expected_primitive,
                "also": list(c.also_expected),
            },
            "broken": {
                "description": c.broken.description,
                "precision": _precision_dict(c.broken.precision),
                "detected": self.detected,
                "first_offending": _event_dict(self.first),
                "missing_kinds": list(self.missing),
                "output_finite": self.broken_finite,
                "report": self.broken_report.to_dict(),
            },
            "fixed": {
                "description": c.fixed.description,
                "precision": _precision_dict(c.fixed.precision),
                "clean": self.fixed_clean,
                "output_finite": self.fixed_finite,
                "first_event": _event_dict(self.fixed_report.first),
                "report": self.fixed_report.to_dict(),
            },
            "ok": self.ok,
        }


@dataclass
class CatalogueResult:
    results: list[CaseResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, name: str) -> CaseResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "detected": sum(r.detected for r in self.results),
            "fixed_clean": sum(r.fixed_clean for r in self.results),
            "cases": [r.to_dict() for r in self.results],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})

    def table(self) -> str:
        """One row per case: the expected first offending event at its op path,
        what the monitor actually reported first (its path only if it differs),
        and whether the fix is clean."""
        head = ("case", "mode", "op path", "expected", "found first", "detected", "fix", "fixed clean")
        rows = []
        for r in self.results:
            c, e = r.case, r.first
            expected = f"{c.expected_kind} {c.expected_op}/{c.expected_primitive}"
            if c.also_expected:
                expected += f" +{'+'.join(c.also_expected)}"
            if e is None:
                found = "no severe event"
            else:
                found = f"{e.kind} {e.op}/{e.primitive}" + ("" if e.path == c.path else f" @ {e.path or '<root>'}")
                also = [k for k in c.also_expected if r.broken_report.has(k)]
                found += "".join(f" +{k}" for k in also)
            if r.missing:
                found += f" (missing {', '.join(r.missing)})"
            rows.append((c.name, _mode(c.broken.precision), c.path, expected, found, _yes(r.detected),
                         f"{c.fixed.description} ({_mode(c.fixed.precision)})", _yes(r.fixed_clean)))
        widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [f"float16 exception catalogue: {len(rows)} cases", "", fmt.format(*head).rstrip(),
                 fmt.format(*("-" * w for w in widths)).rstrip()]
        lines += [fmt.format(*row).rstrip() for row in rows]
        n_det = sum(r.detected for r in self.results)
        n_fix = sum(r.fixed_clean for r in self.results)
        lines += ["", f"{n_det}/{len(rows)} broken cases detected at the expected op path and event, "
                      f"{n_fix}/{len(rows)} fixes clean: {'OK' if self.ok else 'FAILED'}"]
        return "\n".join(lines)


def _yes(b: bool) -> str:
    return "yes" if b else "NO"


def _mode(p: Precision) -> str:
    return p.mode + (" ftz" if p.ftz else "")


def _precision_dict(p: Precision) -> dict:
    return {"mode": p.mode, "ftz": p.ftz, "block": p.block, "device_model": p.device_model}


def _event_dict(e: Event | None) -> dict | None:
    if e is None:
        return None
    return {"kind": e.kind, "path": e.path, "op": e.op, "primitive": e.primitive, "stage": e.stage,
            "step": e.step, "count": e.count, "detail": e.detail, "severe": e.severe, "where": e.where()}


# ------------------------------------------------------------------ the cases
# Inputs are built inside each function from fixed seeds, so every run is identical.


def _ff_activations() -> np.ndarray:
    """Feed-forward hidden activations with the outliers SD's FF layers show."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 16, 64)) * 4.0).astype(np.float32)
    x[0, 3, :6] = [41.0, -41.0, 45.5, -52.0, 64.0, -80.0]
    return x


def _gn_large_group() -> np.ndarray:
    rng = np.random.default_rng(2)
    return (rng.standard_normal((1, 64, 64, 20)) * 2.0).astype(np.float32)  # 2 groups of 64*64*10


def _gn_constant_group() -> np.ndarray:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 8, 32)).astype(np.float32)
    x[..., :8] = 0.25  # group 0 of 4 is constant (e.g. a zero-padded or saturated region)
    return x


def _gn(eps: float) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        x = _gn_constant_group()
        c = x.shape[-1]
        return ops.group_norm(x, np.ones(c, np.float32), np.zeros(c, np.float32), num_groups=4, eps=eps)

    return run


def _qkv_padded() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two sequences of 8 tokens, heads=2 x 8; item 0 pads its last 3 keys,
    item 1 is all padding (e.g. an empty, fully masked context)."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 8, 16)).astype(np.float32) for _ in range(3))
    padding = np.zeros((2, 1, 1, 8), np.float32)  # broadcast over heads and queries
    padding[0, ..., 5:] = 1.0
    padding[1] = 1.0
    return q, k, v, padding


def _masked_attention(mask_value: float) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        q, k, v, padding = _qkv_padded()
        return ops.attention(q, k, v, heads=2, mask=padding * np.float32(mask_value))

    return run


def _large_qk() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    sign = rng.choice(np.float32([-1, 1]), (1, 1, 64))
    q = (rng.uniform(92, 100, (1, 16, 64)) * sign).astype(np.float32)
    k = (rng.uniform(92, 100, (1, 16, 64)) * sign).astype(np.float32)
    v = rng.standard_normal((1, 16, 64)).astype(np.float32)
    return q, k, v


def _big_attention(upcast: bool) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        q, k, v = _large_qk()
        return ops.attention(q, k, v, heads=1, upcast_attention=upcast)

    return run


F16 = Precision("f16")
F32_F16 = Precision("f32_f16")
F16_FTZ = Precision("f16", ftz=True)

CASES: tuple[Case, ...] = (
    Case(
        "gelu_tanh", "tanh-GELU: x**3 overflows fp16 for |x| >= 41", "ff",
        "overflow", "gelu", "pow3",
        broken=Variant("gelu(approximate='tanh')", F16, lambda: ops.gelu(_ff_activations(), approximate="tanh")),
        fixed=Variant("gelu_clip(M=10)", F16, lambda: ops.gelu_clip(_ff_activations(), M=10.0)),
        litert_gpu=DeviceOutcome(True, True, "the converter fuses the unclipped tanh-GELU into the GELU builtin: "
                                             "no x**3 tensor; the clipped form stays unfused and clean"),
    ),
    Case(
        "group_norm_sum_squares", "GroupNorm: fp16 sum of squares over 64x64x10 elements overflows", "norm1",
        "overflow", "group_norm", "sum.accumulate",
        broken=Variant("group_norm", F16, lambda: ops.group_norm(_gn_large_group(), num_groups=2)),
        fixed=Variant("same op", F32_F16, lambda: ops.group_norm(_gn_large_group(), num_groups=2)),
        litert_gpu=DeviceOutcome(True, True, "MEAN keeps float32 sums: no fp16 sum of squares exists; what can "
                                             "overflow there is the stored square d*d, for |x - mean| >= 256"),
    ),
    Case(
        "eps_ftz", "GroupNorm eps=1e-5 flushes to zero (FTZ), constant group -> rsqrt(0), NaN", "norm",
        "constant", "group_norm", "eps",
        broken=Variant("eps=1e-5", F16_FTZ, _gn(1e-5)),
        fixed=Variant("eps=1e-3", F16_FTZ, _gn(1e-3)),
        also_expected=("invalid",),
        litert_gpu=DeviceOutcome(True, True, "this GPU (lavapipe) keeps fp16 subnormals, so eps=1e-5 survives; "
                                             "the case needs flush-to-zero hardware"),
    ),
    Case(
        "mask_neg_1e9", "attention mask -1e9 is -inf in fp16; fully masked row -> NaN", "attn2",
        "constant", "attention", "mask",
        broken=Variant("mask=-1e9", F32_F16, _masked_attention(-1e9)),
        fixed=Variant("mask=-1e4", F32_F16, _masked_attention(-1e4)),
        also_expected=("invalid",),
        litert_gpu=DeviceOutcome(False, True, "as predicted: the -1e9 constant is -inf, the fully masked row NaN"),
    ),
    Case(
        "scores_overflow", "attention scores QK^T/sqrt(d) overflow fp16 for large q, k", "attn1",
        "overflow", "attention", "scores",
        broken=Variant("attention", F32_F16, _big_attention(False)),
        fixed=Variant("upcast_attention=True", F32_F16, _big_attention(True)),
        litert_gpu=DeviceOutcome(False, False, "breaks as predicted, but upcast_attention is no fix: the exported "
                                               "graph has no per-op precision and its scores overflow all the same; "
                                               "fp32 kernels (GpuOptions(enforce_f32=True)) are, measured finite"),
    ),
)


def _run_variant(case: Case, variant: Variant) -> tuple[Report, bool]:
    with monitoring() as mon, precision(variant.precision), scope(case.path):
        y = variant.fn()
    return mon.report(), bool(np.isfinite(y).all())


def run_case(case: Case) -> CaseResult:
    """Run one case, broken and fixed, each under a fresh monitor."""
    broken, broken_finite = _run_variant(case, case.broken)
    fixed, fixed_finite = _run_variant(case, case.fixed)
    missing = tuple(k for k in case.also_expected if not broken.has(k))
    return CaseResult(case, broken, fixed, broken_finite, fixed_finite, missing)


def run_on_device(case: Case, device_model: str = "litert-gpu") -> tuple[CaseResult, DeviceOutcome]:
    """Both variants of ``case`` under the device model (f16 kernels, the
    device's own subnormal handling: none flushed on LiteRT's GPU here), as
    a ``CaseResult`` and the outcome in ``DeviceOutcome`` terms."""
    device = Precision("f16", device_model=device_model)
    moved = replace(case, broken=replace(case.broken, precision=device), fixed=replace(case.fixed, precision=device))
    r = run_case(moved)
    return r, DeviceOutcome(r.broken_finite, r.fixed_finite, "")


def run_catalogue(cases: Sequence[Case] | None = None, *, only: Sequence[str] | None = None) -> CatalogueResult:
    """Run the catalogue (all ``CASES`` unless given); ``only`` selects cases by name."""
    cases = CASES if cases is None else tuple(cases)
    if only:
        known = {c.name for c in cases}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"unknown catalogue case(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cases = tuple(c for c in cases if c.name in set(only))
    return CatalogueResult([run_case(c) for c in cases])
