"""The recipe file ``refsd fp16-fix`` writes (schema ``schema/recipe-1.schema.json``):
the fixes with their module paths and parameters, the event each removes and
its cost, and the rewrite string of the fixed model (``recipe_rewrites``),
which ``export``, ``fp16-check`` and ``generate`` apply with ``--recipe``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from refsd.fp16fix.search import Chosen, FixResult, Outcome, Search
from refsd.models.fixes import Fix
from refsd.models.rewrites import Rewrites
from refsd.monitor import Event
from refsd.safe_io import check_schema, read_json
from refsd.weights import model_sha256

SCHEMA_PATH = Path(__file__).with_name("schema") / "recipe-1.schema.json"

COSTS = {
    "gelu_clip": "tanh-GELU's input clipped to [-M, M]: the output changes only where |x| > M, where tanh has "
                 "saturated (one MINIMUM and one MAXIMUM in the graph)",
    "eps": "a larger eps changes 1/sqrt(var + eps) by at most eps / (2 var) relative (5e-5 for var >= 1 at eps "
           "1e-4); nothing in the graph",
    "mask": "the additive mask's constant; softmax weights of masked keys stay below exp(-1e4): none in f32",
    "gn_fused": "GroupNorm as one kernel with float32 sums; no change to the exported graph (LiteRT's GPU "
                "MEAN keeps float32 sums)",
    "scale_qk": "one MUL of q by 1/sqrt(d) before Q K^T instead of scaling the scores: same function, one "
                "rounding moved",
    "fp32": "the module runs in float32: a separate fp32 sub-model, or a CPU fallback on a GPU accelerator "
            "without per-op precision (slower, more memory)",
}


def _event(e: Event) -> dict:
    d = asdict(e)
    return {k: d[k] for k in ("kind", "path", "op", "primitive", "stage", "step", "count", "detail")}


def _db(v: float | None):
    if v is None or math.isnan(v):
        return None
    return "inf" if math.isinf(v) else round(v, 3)


def _outcome(o: Outcome | None) -> dict | None:
    if o is None:
        return None
    return {"severe_events": len(o.severe), "first": _event(o.severe[0]) if o.severe else None,
            "psnr_db": _db(o.psnr_db)}


def _fix(c: Chosen) -> dict:
    f = c.fix
    return {"token": str(f), "kind": f.kind, "path": f.path, "value": f.value, "level": c.level,
            "why": _event(c.event), "cost": COSTS[f.kind]}


def make_recipe(search: Search, result: FixResult) -> dict:
    """The recipe document of a finished search."""
    p, req = search.precision, search.request
    base = search.base
    doc = {
        "schema": "refsd-fp16-recipe",
        "schema_version": 1,
        "model_sha256": model_sha256(search.pipe.model_dir),
        "request": asdict(req),
        "deployment": {"precision": p.mode, "ftz": p.ftz, "block": p.block, "device_model": p.device_model,
                       "rewrites": str(base), "gelu_approximate": search.gelu_approximate},
        "min_psnr_db": search.min_psnr,
        "status": result.status,
        "fixes": [_fix(c) for c in result.chosen],
        "rewrites": str(Rewrites.parse(base, fixes=base.fixes + tuple(result.fixes))),
        "before": _outcome(result.before),
        "after": _outcome(result.after),
        "fixes_cost_psnr_db": _db(result.fixes_cost_psnr_db),
        "search": {"reruns": result.reruns, "max_reruns": search.max_reruns, "seconds": round(result.seconds, 2),
                   "log": list(result.log)},
    }
    check_schema(doc, schema(), "recipe (as written)")
    return doc


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def read_recipe(path) -> dict:
    """A recipe file, checked against the schema and for consistency: each fix's token is its
    kind, path and value, and ``rewrites`` is the deployment's plus the fixes. ValueError (one
    line naming the file and key) on anything else."""
    label = f"--recipe {path}"
    doc = read_json(path, what=label)
    check_schema(doc, schema(), label)
    try:
        fixes = []
        for i, f in enumerate(doc["fixes"]):
            fix = Fix(f["kind"], f["path"], f["value"])
            if str(fix) != f["token"] and Fix.parse(f["token"]) != fix:
                raise ValueError(f"fixes/{i}: token {f['token']!r} is not {fix}")
            fixes.append(fix)
        base = Rewrites.parse(doc["deployment"]["rewrites"])
        rw = Rewrites.parse(base, fixes=base.fixes + tuple(fixes))
        if Rewrites.parse(doc["rewrites"]) != rw:
            raise ValueError(f"rewrites {doc['rewrites']!r} is not deployment/rewrites plus the fixes ({rw})")
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    return doc


def recipe_rewrites(doc: dict, rewrites="none") -> Rewrites:
    """``rewrites`` (a command line's ``--rewrites``) with the recipe's rewrites added."""
    own = Rewrites.parse(doc["rewrites"])
    rw = Rewrites.parse(rewrites)
    return Rewrites.parse([*rw.names, *own.names], fixes=rw.fixes + own.fixes,
                          **{k: getattr(own, k) for k in ("serial_conv_limit", "prune_amount", "prune_min_weights")})
