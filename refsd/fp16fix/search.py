"""The search for the smallest fp16 fix of a deployment (``refsd fp16-fix``).

A candidate is a set of per-module fixes (``refsd.models.fixes``). It is
*clean* when the deployment with those fixes has no severe fp16 event (the
exception monitor's overflow, invalid NaN, constant lost to inf or zero) and
its image is within ``min_psnr`` dB of the float32 reference. The search:

1. runs the float32 reference and the deployment free-running; clean: an empty
   recipe, done;
2. **catalogue**: for each severe event, the catalogue fix at the module the
   monitor names, with its parameter (``gelu_clip`` M = 10, a GroupNorm or
   LayerNorm ``eps`` of 1e-4, a ``mask`` of -1e4, a GroupNorm whose fp16 sum of
   squares overflows as one float32-sum kernel, ``gn_fused``); rerun, fix what the rerun
   locates next, until nothing new is located;
3. **rewrites** that move where fp16 overflows (``scale_qk``: ``q`` scaled
   before ``Q K^T``) for the events the catalogue has no fix for, the same way;
4. **fp32**: the modules of the events left, plus those the reruns then locate,
   kept in float32, minimized by delta debugging (ddmin, Zeller 2002) over those
   module paths: a 1-minimal set, anywhere in the network, not a prefix;
5. a pruning pass drops every fix whose removal keeps the candidate clean
   (a fix for a constant lost at its own op is never dropped: that event is the
   constant itself);
6. a free-running run of the result confirms it: no severe event, PSNR >= the bound.

**Reruns are reused.** Steps 2-5 judge candidates teacher-forced from the f32
reference, one stage at a time: the text encoder on the request's ids, each
UNet step on the reference's latents and text states, the decoder on the
reference's last latents. That is sound because a stage's events then depend
only on that stage's own fixes: a candidate reruns only the stages its fixes
changed, and every stage result is cached by its fixes (ddmin revisits
subsets). Only the free-running runs (1 and 6) see the trajectory; events they
find that teacher forcing did not (drift) are fed back into the search.

**Budget**: ``max_reruns`` reruns in all (a teacher-forced stage rerun counts
one, a free-running pipeline three); past it the search stops and returns the
best candidate so far, marked ``budget``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from refsd import trace as names
from refsd.context import location
from refsd.image import psnr, to_image
from refsd.models.fixes import Fix
from refsd.models.options import ModelOptions
from refsd.models.rewrites import Rewrites
from refsd.monitor import Event, Monitor, monitoring
from refsd.numerics import Precision
from refsd.pipeline import Pipeline, Request
from refsd.schedulers import make_scheduler
from refsd.trace import MODELS
from refsd.weights import load_model

# A correct fp16 deployment of the tiny models stays at 37.8-43.8 dB of f32 on LiteRT's GPU
# (README, GPU capture) and an overflow that reaches the image takes it far below (a NaN image
# has no PSNR at all); 30 dB leaves 8 dB for other prompts and seeds.
DEFAULT_MIN_PSNR = 30.0
DEFAULT_MAX_RERUNS = 200
FREE_RUN_COST = 3  # a free-running run reruns all three stages

GELU_OPS = ("gelu", "geglu", "gelu_fused", "geglu_fused")
ATTENTION_OPS = ("attention", "softmax_partial_fused", "flash_attention")
NORM_OPS = ("group_norm", "gn4d", "group_norm_fused", "layer_norm")
GELU_CLIP_M = 10.0  # Choi et al. 2023: tanh has saturated long before 10, and 10**3 cannot overflow
SAFE_EPS = 1e-4  # the smallest power of ten that is a normal fp16 number (2**-14 = 6.1e-5)
SAFE_MASK = -1e4  # survives fp16; a fully masked row stays finite (refsd.catalogue, mask_neg_1e9)

LEVELS = ("catalogue", "rewrite", "fp32")


class BudgetExhausted(Exception):
    pass


@dataclass(frozen=True)
class Chosen:
    """One fix of the result and why: the event it was chosen for, its level."""

    fix: Fix
    level: str
    event: Event


@dataclass
class Outcome:
    """A candidate judged free-running: its severe events and its image's PSNR against f32."""

    severe: list[Event]
    psnr_db: float
    image: np.ndarray

    def clean(self, min_psnr: float) -> bool:
        return not self.severe and self.psnr_db >= min_psnr


@dataclass
class FixResult:
    status: str  # "clean" (no fix needed), "fixed", "budget", "unfixed"
    chosen: list[Chosen]
    before: Outcome
    after: Outcome | None
    fixes_cost_psnr_db: float | None  # the fixed model in f32 against the original in f32
    reference_image: np.ndarray
    reruns: int
    seconds: float
    log: list[str] = field(default_factory=list)

    @property
    def fixes(self) -> list[Fix]:
        return [c.fix for c in self.chosen]


def catalogue_fix(e: Event) -> Fix | None:
    """The catalogue's fix for a severe event at its module, or None."""
    if e.kind == "constant" and e.primitive == "eps":
        return Fix("eps", e.path, SAFE_EPS)
    if e.kind == "invalid" and e.op in NORM_OPS:  # rsqrt(var + eps) of a constant group with a lost eps
        return Fix("eps", e.path, SAFE_EPS)
    if e.kind == "constant" and e.primitive == "mask" and e.op in ATTENTION_OPS:
        return Fix("mask", e.path, SAFE_MASK)
    if e.kind in ("overflow", "invalid") and e.op in GELU_OPS:
        return Fix("gelu_clip", e.path, GELU_CLIP_M)
    if e.kind == "overflow" and e.op in ("group_norm", "gn4d") and e.primitive.startswith("sum"):
        return Fix("gn_fused", e.path)  # refsd.catalogue group_norm_sum_squares: float32 sums inside the op
    return None


def rewrite_fix(e: Event) -> Fix | None:
    """A rewrite that moves where fp16 overflows, for an event the catalogue has no fix for."""
    if e.kind == "overflow" and e.op in ATTENTION_OPS and e.primitive != "mask":
        return Fix("scale_qk", e.path)
    return None


def ddmin(items: list, test: Callable[[list], bool]) -> list:
    """A 1-minimal subset of ``items`` for which ``test`` holds (``test(items)`` must):
    Zeller and Hildebrandt's delta debugging, subsets then complements, granularity doubling."""
    n = 2
    while len(items) >= 2:
        size = math.ceil(len(items) / n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        for c in chunks:
            if test(c):
                items, n = c, 2
                break
        else:
            for c in chunks:
                rest = [x for x in items if x not in c]
                if test(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(2 * n, len(items))
    if len(items) == 1 and test([]):
        return []
    return items


class Search:
    """One request on one deployment: the reruns and their caches (see the module doc).
    ``measure_cost``: also run the fixed model in f32 against the original (what the fixes
    alone change: ``FixResult.fixes_cost_psnr_db``), one free-running run more."""

    def __init__(self, model_dir, request: Request, precision: Precision, *, rewrites="none",
                 gelu_approximate: str = "none", min_psnr: float = DEFAULT_MIN_PSNR,
                 max_reruns: int = DEFAULT_MAX_RERUNS, progress: Callable[[str], None] | None = None,
                 measure_cost: bool = True) -> None:
        if not precision.storage16:
            raise ValueError(f"fp16-fix needs an fp16 precision (f32_f16 or f16), not {precision.mode}")
        if not (isinstance(max_reruns, int) and max_reruns >= 2 * FREE_RUN_COST):
            raise ValueError(f"--max-reruns must be an integer >= {2 * FREE_RUN_COST}, got {max_reruns!r}")
        if not math.isfinite(min_psnr):
            raise ValueError(f"--min-psnr must be a finite number of dB, got {min_psnr!r}")
        self.request, self.precision, self.min_psnr = request, precision, float(min_psnr)
        self.base = Rewrites.parse(rewrites)
        self.gelu_approximate = gelu_approximate
        self.max_reruns, self.reruns = max_reruns, 0
        self.measure_cost = measure_cost
        self._progress = progress or (lambda line: None)
        self.log: list[str] = []
        f32 = {m: self._options(m, (), Precision("f32")) for m in MODELS}
        self.pipe = Pipeline(model_dir, options=f32)
        t0 = time.perf_counter()
        self.reference = self.pipe(request, progress=False)
        self.say(f"f32 reference: {time.perf_counter() - t0:.1f} s")
        self.reference_image = to_image(self.reference.trace[names.IMAGE][0])
        self.ids = self.pipe.request_ids(request)
        self._models: dict[tuple, object] = {}
        self._stage_cache: dict[tuple, list[Event]] = {}
        self._free_cache: dict[frozenset, Outcome] = {}
        self._so_far: dict[Fix, Chosen] = {}  # the fixes chosen so far: what a search out of budget returns

    # -- runs

    def say(self, line: str) -> None:
        self.log.append(line)
        self._progress(line)

    def _charge(self, n: int) -> None:
        if self.reruns + n > self.max_reruns:
            raise BudgetExhausted
        self.reruns += n

    def _options(self, stage: str, fixes: Iterable[Fix], p: Precision | None = None) -> ModelOptions:
        own = tuple(f for f in fixes if f.stage == stage)
        rw = Rewrites.parse(self.base, fixes=self.base.fixes + own) if own else self.base
        return ModelOptions.make(precision=p or self.precision, rewrites=rw, gelu_approximate=self.gelu_approximate)

    def _model(self, stage: str, fixes: Iterable[Fix], p: Precision | None = None):
        own = frozenset(f for f in fixes if f.stage == stage)
        key = (stage, own, p)
        if key not in self._models:
            options = self._options(stage, own, p)
            self._models[key] = load_model(self.pipe.model_dir / stage, stage, options=options)
        return self._models[key]

    def stage_events(self, stage: str, fixes: frozenset) -> list[Event]:
        """Severe events of one stage teacher-forced from the f32 reference, under ``fixes``."""
        own = frozenset(f for f in fixes if f.stage == stage)
        key = (stage, own)
        if key in self._stage_cache:
            return self._stage_cache[key]
        self._charge(1)
        model, ref = self._model(stage, own), self.reference.trace
        with monitoring() as mon:
            if stage == "text_encoder":
                with location("text_encoder"):
                    model(self.ids)
            elif stage == "unet":
                sched = make_scheduler(self.request.scheduler, self.pipe.scheduler_config)
                timesteps = sched.set_timesteps(self.request.steps)
                context = ref[names.HIDDEN_STATES]
                for i, t in enumerate(timesteps):
                    x = ref[names.LATENTS_INIT] if i == 0 else ref[names.latents(i - 1)]
                    with location("unet", i):
                        model(sched.scale_model_input(np.concatenate([x, x]), i), t, context)
            else:
                with location("vae"):
                    model.decode_latents(ref[names.latents(self.request.steps - 1)])
        events = [e for e in mon.report().events if e.severe]
        self._stage_cache[key] = events
        return events

    def teacher_events(self, fixes: frozenset) -> list[Event]:
        return [e for m in MODELS for e in self.stage_events(m, fixes)]

    def free(self, fixes: frozenset, p: Precision | None = None) -> Outcome:
        """The whole request free-running under ``fixes``: severe events and PSNR against f32."""
        key = (fixes, p)
        if key not in self._free_cache:
            self._charge(FREE_RUN_COST)
            pipe = copy.copy(self.pipe)
            pipe.components = {m: self._model(m, fixes, p) for m in MODELS}
            result = pipe(self.request, progress=False, monitor=Monitor())
            image = to_image(result.trace[names.IMAGE][0])
            severe = [e for e in result.report.events if e.severe]
            self._free_cache[key] = Outcome(severe, psnr(self.reference_image, image), image)
        return self._free_cache[key]

    # -- the search

    def run(self) -> FixResult:
        t0 = time.perf_counter()
        before = self.free(frozenset())
        self.say(f"deployment as declared: {len(before.severe)} severe events, PSNR {before.psnr_db:.1f} dB "
                 f"against f32 (bound {self.min_psnr:g} dB)")
        if before.clean(self.min_psnr):
            self.say("clean: no fix needed")
            return self._result("clean", [], before, None, t0)
        if not before.severe:
            self.say("no severe event locates the error: fp16 rounding alone is below the bound, and fixes "
                     "are searched where events are (no fix)")
            return self._result("unfixed", [], before, None, t0)
        chosen: dict[Fix, Chosen] = {}
        status = "unfixed"
        try:
            chosen = self._search(before)
            after = self.free(frozenset(chosen))
            if after.clean(self.min_psnr):
                status = "fixed"
            self.say(f"fixed model free-running: {len(after.severe)} severe events, PSNR {after.psnr_db:.1f} dB"
                     + ("" if status == "fixed" else ": not within the bound"))
        except BudgetExhausted:
            status, after, chosen = "budget", None, self._so_far
            self.say(f"budget of {self.max_reruns} reruns spent: stopped with {len(chosen)} fix(es) so far")
        return self._result(status, list(chosen.values()), before, after, t0)

    def _result(self, status, chosen, before, after, t0) -> FixResult:
        cost = None
        if chosen and status != "budget" and self.measure_cost:
            try:
                cost = self.free(frozenset(c.fix for c in chosen), Precision("f32")).psnr_db
            except BudgetExhausted:
                pass
        order = {lv: i for i, lv in enumerate(LEVELS)}
        chosen = sorted(chosen, key=lambda c: (order[c.level], c.fix))
        return FixResult(status, chosen, before, after, cost, self.reference_image, self.reruns,
                         time.perf_counter() - t0, self.log)

    def _located(self, fixes: frozenset, free: Outcome | None) -> list[Event]:
        """Severe events of a candidate: teacher-forced, plus those its free run found (drift)."""
        seen, out = set(), []
        for e in self.teacher_events(fixes) + (free.severe if free else []):
            key = (e.kind, e.path, e.op, e.primitive)
            if key not in seen:
                seen.add(key)
                out.append(e)
        return out

    def _propose(self, chosen: dict, free: Outcome | None, levels: tuple[str, ...]) -> dict:
        """Fix located events with the given levels until a rerun locates nothing new to fix."""
        while True:
            events = self._located(frozenset(chosen), free)
            new = {}
            for e in events:
                for level, propose in (("catalogue", catalogue_fix), ("rewrite", rewrite_fix)):
                    f = propose(e) if level in levels else None
                    if f is not None and f not in chosen and f not in new:
                        new[f] = Chosen(f, level, e)
                        break
            if not new:
                if chosen:
                    self.say(f"{'/'.join(levels)}: {len(events)} severe event(s) left teacher-forced, "
                             f"{self.reruns} reruns so far")
                return chosen
            chosen = self._so_far = {**chosen, **new}
            shown = sorted(str(f) for f in new)
            listed = ", ".join(shown[:4]) + (f", and {len(shown) - 4} more" if len(shown) > 4 else "")
            self.say(f"{'/'.join(levels)}: +{len(new)} fix(es) ({listed}); {len(chosen)} in all")
            free = None

    def _search(self, before: Outcome) -> dict:
        chosen = self._propose({}, before, ("catalogue",))
        chosen = self._propose(chosen, None, ("catalogue", "rewrite"))
        left = self._located(frozenset(chosen), None)
        if not left:
            after = self.free(frozenset(chosen))
            if after.severe:  # the trajectory found events teacher forcing did not
                chosen = self._propose(chosen, after, ("catalogue", "rewrite"))
                left = self._located(frozenset(chosen), after)
        if left:
            chosen = self._fp32(chosen, left)
        return self._prune(chosen)

    def _fp32(self, chosen: dict, left: list[Event]) -> dict:
        """Keep in fp32 the modules of the events left and those reruns locate next, then ddmin."""
        why: dict[str, Event] = {}

        def grow(events):
            for e in events:
                if "." in e.path and e.path not in why:  # a root model's own ops are not a module's
                    why[e.path] = e

        grow(left)
        self.say(f"fp32: {len(why)} module(s) with events no catalogue fix or rewrite removes")

        def with_fp32(paths) -> frozenset:
            return frozenset(chosen) | {Fix("fp32", p) for p in paths}

        while True:
            events = self.teacher_events(with_fp32(why))
            n = len(why)
            grow(events)
            if not events or len(why) == n:
                break
        if self.teacher_events(with_fp32(why)):
            self.say(f"fp32: {len(why)} module(s) in fp32 still leave severe events: no fp32 set found")
            return chosen
        paths = sorted(why)
        keep = ddmin(paths, lambda sub: not self.teacher_events(with_fp32(sub)))
        self.say(f"fp32: ddmin kept {len(keep)} of {len(paths)} module(s) in fp32 ({', '.join(keep)})")
        return {**chosen, **{Fix("fp32", p): Chosen(Fix("fp32", p), "fp32", why[p]) for p in keep}}

    def _prune(self, chosen: dict) -> dict:
        """Drop each fix whose removal leaves the candidate clean (teacher-forced)."""
        order = {lv: i for i, lv in enumerate(LEVELS)}
        for fix in sorted(chosen, key=lambda f: (-order[chosen[f].level], f)):
            if chosen[fix].event.kind == "constant" and chosen[fix].event.path == fix.path:
                continue  # the lost constant is this op's own: only this fix restores it
            rest = frozenset(f for f in chosen if f != fix)
            if not self.teacher_events(rest):
                self.say(f"prune: {fix} not needed")
                chosen = self._so_far = {f: c for f, c in chosen.items() if f != fix}
        return chosen


def find_fix(model_dir, request: Request, precision: Precision, *, rewrites="none",
             min_psnr: float = DEFAULT_MIN_PSNR, max_reruns: int = DEFAULT_MAX_RERUNS, **kw) -> FixResult:
    """Search the smallest fix of ``request`` on the deployment (see the module doc); ``kw``: the
    rest of ``Search``'s options."""
    return Search(model_dir, request, precision, rewrites=rewrites, min_psnr=min_psnr, max_reruns=max_reruns,
                  **kw).run()


__all__ = ["DEFAULT_MAX_RERUNS", "DEFAULT_MIN_PSNR", "BudgetExhausted", "Chosen", "FixResult", "Outcome", "Search",
           "catalogue_fix", "ddmin", "find_fix", "rewrite_fix"]
