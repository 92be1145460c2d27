"""The float16 exception monitor.

Every op reports to the active monitor under its module path
(``unet.down_blocks.1.attentions.0.transformer_blocks.0.ff``), with the stage
(``text_encoder``, ``unet``, ``vae``) and denoising step when given::

    with monitoring() as mon, precision("f16"), location(stage="unet", step=3), scope("unet.mid_block"):
        y = ops.group_norm(x, gamma, beta, num_groups=32, eps=1e-5)
    print(mon.report().table())

Events (element counts, per op and primitive):

``overflow``    a finite value rounds to inf in fp16, or a primitive computes inf
                from finite inputs (``rsqrt(0)``, ``exp(12)`` in fp16 math)
``invalid``     NaN produced from NaN-free op inputs (``inf - inf``, ``0 * inf``)
``propagated``  the op's inputs already held inf/NaN and so does its output
``underflow``   a non-zero value becomes zero (``to_zero``) or an fp16 subnormal
``constant``    a constant (eps, mask, weight) does not survive fp16: becomes
                inf or zero (severe), or subnormal (precision lost; zero on FTZ hardware)
``precision``   a tensor the deployed graph stores in fp16 is too coarse for
                the op that reads it (sin/cos of timestep arguments whose fp16
                spacing exceeds ``refsd.ops.embedding.ARG_SPACING_LIMIT``); not severe

and, per op output, headroom ``log2(65504 / max|y|)``: bits of magnitude left
before fp16 overflows (negative in ``f32`` mode means "would overflow in fp16").

The monitor costs two reductions per op output and aggregates per
(stage, path, op), so it can stay on for whole pipelines.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

from refsd.context import current_location, current_path
from refsd.numerics import FP16_MAX

EVENT_KINDS = ("overflow", "invalid", "propagated", "underflow", "constant", "precision")


@dataclass(frozen=True)
class Event:
    seq: int  # order of occurrence in the run
    kind: str
    path: str
    op: str
    primitive: str
    stage: str | None
    step: int | None
    count: int
    detail: str
    severe: bool  # overflow, invalid, and constants that become inf or zero

    def where(self) -> str:
        at = self.path or "<root>"
        if self.stage is not None:
            at = f"{self.stage}:{at}"
        if self.step is not None:
            at += f" @step {self.step}"
        return at


@dataclass
class OpStat:
    """One (stage, path, op) aggregated over calls and steps."""

    stage: str | None
    path: str
    op: str
    calls: int = 0
    max_abs: float = 0.0
    worst_step: int | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def headroom(self) -> float:
        return headroom(self.max_abs)


def headroom(max_abs: float) -> float:
    """Bits of magnitude left before fp16 overflow: ``log2(65504 / max|y|)``."""
    if math.isnan(max_abs) or math.isinf(max_abs):
        return -math.inf
    if max_abs == 0.0:
        return math.inf
    return math.log2(FP16_MAX / max_abs)


class Monitor:
    """Collects events and per-op magnitudes. Use via ``monitoring()``."""

    def __init__(self, max_events: int = 10_000, *, underflow: bool = True) -> None:
        """``underflow=False``: collect no ``underflow`` events (a certificate's
        calibration run needs only its overflows), which lets the fp16
        accumulations skip their per-element counting (``refsd.ops._core.matmul``)."""
        self.max_events = max_events
        self.underflow = underflow
        self.events: list[Event] = []
        self.dropped_events = 0
        self.stats: dict[tuple[str | None, str, str], OpStat] = {}
        self._index: dict[tuple, int] = {}
        self._seq = 0

    def event(self, kind: str, op: str, primitive: str, count: int, detail: str, severe: bool) -> None:
        assert kind in EVENT_KINDS, kind
        if kind == "underflow" and not self.underflow:
            return
        path, (stage, step) = current_path(), current_location()
        stat = self._stat(stage, path, op)
        stat.counts[kind] = stat.counts.get(kind, 0) + count
        # One event row per (stage, step, path, op, primitive, kind, detail):
        # repeated calls (a loop over layers) add counts instead of rows.
        key = (stage, step, path, op, primitive, kind, detail)
        if key in self._index:
            ev = self.events[self._index[key]]
            # replace(), not asdict(): asdict deep-copies every field, and f16 runs
            # repeat the same event ~10^5 times (underflow in blocked partial sums).
            self.events[self._index[key]] = replace(ev, count=ev.count + count)
            return
        if len(self.events) >= self.max_events:
            self.dropped_events += 1
            return
        self._seq += 1
        self._index[key] = len(self.events)
        self.events.append(Event(self._seq, kind, path, op, primitive, stage, step, count, detail, severe))

    def op_output(self, op: str, max_abs: float) -> None:
        path, (stage, step) = current_path(), current_location()
        stat = self._stat(stage, path, op)
        stat.calls += 1
        # NaN outranks any magnitude: the op has already gone past overflow.
        if stat.calls == 1 or math.isnan(max_abs) or (not math.isnan(stat.max_abs) and max_abs > stat.max_abs):
            stat.max_abs = max_abs
            stat.worst_step = step

    def _stat(self, stage: str | None, path: str, op: str) -> OpStat:
        key = (stage, path, op)
        stat = self.stats.get(key)
        if stat is None:
            stat = self.stats[key] = OpStat(stage, path, op)
        return stat

    def report(self, top: int = 10) -> "Report":
        return Report(self, top)


class Report:
    """What a monitored run found: first offending op, counts, ops closest to overflow."""

    def __init__(self, monitor: Monitor, top: int = 10) -> None:
        self.events = list(monitor.events)
        self.dropped_events = monitor.dropped_events
        severe = [e for e in self.events if e.severe]
        self.first = severe[0] if severe else (self.events[0] if self.events else None)
        self.counts = {k: sum(e.count for e in self.events if e.kind == k) for k in EVENT_KINDS}
        self.ops_with = {k: len({(e.stage, e.path, e.op) for e in self.events if e.kind == k}) for k in EVENT_KINDS}
        self.closest = sorted(monitor.stats.values(), key=lambda s: (s.headroom, s.path))[:top]
        self.n_ops = len(monitor.stats)

    @property
    def clean(self) -> bool:
        """No severe event (overflow, invalid NaN, constant lost to inf/zero)."""
        return not any(e.severe for e in self.events)

    def has(self, kind: str) -> bool:
        return self.counts.get(kind, 0) > 0

    def to_dict(self) -> dict:
        def ev(e: Event | None):
            return None if e is None else {**asdict(e), "where": e.where()}

        return {
            "clean": self.clean,
            "ops_monitored": self.n_ops,
            "first_offending": ev(self.first),
            "counts": self.counts,
            "ops_with_event": self.ops_with,
            "closest_to_overflow": [
                {
                    "stage": s.stage,
                    "path": s.path,
                    "op": s.op,
                    "max_abs": _json_float(s.max_abs),
                    "headroom_bits": _json_float(s.headroom),
                    "step": s.worst_step,
                    "calls": s.calls,
                }
                for s in self.closest
            ],
            "events": [ev(e) for e in self.events],
            "dropped_events": self.dropped_events,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})

    def table(self, max_events: int = 20) -> str:
        lines = []
        if self.first is None:
            lines.append(f"no float16 events in {self.n_ops} ops")
        else:
            e = self.first
            tag = "first offending op" if e.severe else "first event (no severe events)"
            lines.append(f"{tag}: {e.where()}  op={e.op} primitive={e.primitive}  {e.kind}: {e.detail}")
        lines.append("")
        lines.append("event        count  ops")
        for k in EVENT_KINDS:
            lines.append(f"{k:<11} {self.counts[k]:>7}  {self.ops_with[k]:>3}")
        if self.events:
            # Severe events first (in order of occurrence), then the warnings:
            # underflow is common and would otherwise bury the overflow.
            severe = [e for e in self.events if e.severe]
            shown = (severe + [e for e in self.events if not e.severe])[:max_events]
            lines.append("")
            lines.append(f"events ({len(severe)} severe, {len(self.events) - len(severe)} warnings; "
                         f"first {len(shown)}, severe first):")
            for e in shown:
                mark = "!" if e.severe else " "
                lines.append(f" {mark} {e.kind:<10} {e.count:>8}  {e.where()}  {e.op}/{e.primitive}  {e.detail}")
        lines.append("")
        lines.append("closest to overflow (headroom = log2(65504 / max|y|)):")
        lines.append(f"  {'headroom':>8}  {'max|y|':>10}  step  op")
        for s in self.closest:
            step = "-" if s.worst_step is None else str(s.worst_step)
            where = f"{s.stage}:{s.path or '<root>'}" if s.stage else (s.path or "<root>")
            lines.append(f"  {s.headroom:>8.2f}  {s.max_abs:>10.4g}  {step:>4}  {where} ({s.op})")
        return "\n".join(lines)


def _json_float(v: float):
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


_MONITOR: contextvars.ContextVar[Monitor | None] = contextvars.ContextVar("refsd_monitor", default=None)


def active_monitor() -> Monitor | None:
    return _MONITOR.get()


@contextlib.contextmanager
def monitoring(monitor: Monitor | None = None) -> Iterator[Monitor]:
    """Install a monitor for the enclosed ops (a fresh one unless given)."""
    mon = monitor if monitor is not None else Monitor()
    token = _MONITOR.set(mon)
    try:
        yield mon
    finally:
        _MONITOR.reset(token)


@contextlib.contextmanager
def unwatched() -> Iterator[None]:
    """Run the enclosed ops with no monitor (an op that computes unwatched
    first and again watched only when it must)."""
    token = _MONITOR.set(None)
    try:
        yield
    finally:
        _MONITOR.reset(token)
