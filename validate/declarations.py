"""What a stage declaration (capture.json ``stages``) means: the one source
of the schema's description text (``schema/capture-2.schema.json`` is
generated from these tables: :func:`schema_document`, checked by
tests/test_declarations.py), of the README's runtime table
(:func:`runtime_table`), and of what certify checks a declaration against
exactly (:func:`declaration_checks`: values a stage's declared precision
cannot hold).

Regenerate the schema after editing a table here::

    python -c "from refsd_validate.declarations import write_schema; write_schema()"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from refsd import trace

# Each stage key of ``stages``: what it covers.
STAGES = {
    "text_encoder": "the text encoder, both prompts",
    "unet": "the UNet, at every step",
    "vae": "the VAE decoder",
    "guidance_scheduler": "classifier-free guidance (uncond + g (cond - uncond)) and the scheduler step, at every "
                          "step; a precision declared for the models does not cover it: declare where and how it "
                          "ran (diffusers' pipeline in fp16 runs both on the fp16 tensors, an app often on the host "
                          "in f32)",
}

# Each ``precision``: what the stage stores and computes. On guidance_scheduler f32_f16 and f16 are calibrated
# alike (tolerance.stage_variants: a few elementwise ops, which a framework on fp16 tensors rounds one by one).
PRECISIONS = {
    "f32": "fp32 tensors and fp32 math",
    "f32_f16": "fp16 tensors between ops, fp32 math inside each op, each op's output rounded to fp16 once (PyTorch's "
               "fp16 on a CPU: tests/test_diffusers_device.py)",
    "f16": "fp16 tensors and fp16 math inside ops too: partial sums and intermediate values rounded to fp16 (LiteRT's "
           "GPU accelerator or delegate at fp16 precision, most mobile GPUs and NPUs); the weaker declaration: wider "
           "floors, a coarser certificate (its resolution says how coarse). Declare f32_f16 only where each op is "
           "known to compute in fp32 and round once",
}
GUIDANCE_PRECISIONS = ("on guidance_scheduler, f32_f16 and f16 are calibrated alike: the step fused and rounded once, "
                       "and a framework's primitive-by-primitive fp16 with its scalar coefficients rounded to fp16 "
                       "(diffusers' scheduler on fp16 tensors, reproduced bit for bit)")
BF16 = ("bf16 activations (8 significant bits) are not calibrated and cannot be declared: run the stage with fp16 "
        "(f32_f16, f16) or fp32 (f32) activations; bf16-stored weights computed in fp32 are model.weights 'bf16' "
        "with precision f32")

# Each ``processor``: where the stage ran, and what that changes in the floors unless the stage says otherwise.
PROCESSORS = {
    "cpu": "a CPU (int8 weights: LiteRT's hybrid kernels unless int8_kernels says otherwise)",
    "gpu": "a GPU (fast-math transcendentals unless fast_math is false; at f16 the floors also include refsd's "
           "model of LiteRT's GPU kernels; int8 weights dequantized)",
    "npu": "a neural accelerator (fast math unless fast_math is false; int8 weights dequantized)",
    "dsp": "a DSP (as npu)",
    "host": "the host CPU beside the device, e.g. an app's own guidance and scheduler code (as cpu)",
    "other": "anything else (no fast math, int8 weights dequantized)",
}
FTZ = ("fp16 subnormals (|x| < 2^-14) flushed to zero, as many mobile GPUs do; null: unknown (the floors then cover "
       "both, measured 3-5x wider: say it when you know it); ignored on a stage declared f32 (fp32 subnormals are "
       "kept, as in the reference)")

# The runtime table (README, "Capture from your own runtime"): runtime -> (the models' stages, guidance_scheduler,
# why). "not certifiable" rows say what to run instead.
RUNTIMES = [
    ("LiteRT, CPU (builtin kernels, XNNPACK), fp32 model", "cpu, f32", "where the app runs it (host, f32)",
     "int8 weights: model.weights int8 (hybrid kernels)"),
    ("LiteRT, GPU accelerator or delegate, fp16 precision", "gpu, f16, ftz if known", "where the app runs it",
     "the GPU's own fp16 math inside kernels"),
    ("LiteRT, GPU, fp32 precision (no precision loss)", "gpu, f32", "where the app runs it", ""),
    ("PyTorch CPU, float32", "cpu, f32", "cpu, f32", ""),
    ("PyTorch CPU, float16 (diffusers)", "cpu, f32_f16, ftz false", "cpu, f16 (or f32_f16: calibrated alike)",
     "each op in fp32, rounded once; which fp32 formula varies by CPU kernel path, far below the floors (below)"),
    ("PyTorch CPU, bfloat16", "not certifiable", "", BF16),
    ("ONNX Runtime, CPU, fp32 model", "cpu, f32", "where the app runs it", ""),
    ("ONNX Runtime, fp16 model (CPU, CUDA, DirectML, NNAPI)", "f16 on the processor that ran it", "as it ran",
     "f32_f16 only where each fp16 op is known to compute in fp32"),
    ("Core ML, compute precision FLOAT16 (GPU, Neural Engine)", "gpu or npu, f16", "as it ran",
     "FLOAT32 on CPU only: cpu, f32"),
    ("a vendor NPU, int8 weights, float activations", "npu, the activations' precision (usually f16)", "as it ran",
     "model.weights int8, int8_kernels dequantize"),
    ("a vendor NPU, int8 activations (full-integer)", "not certifiable", "",
     "int8 activations are not calibrated: capture a float-activation build of the same weights"),
]


def describe_precision() -> str:
    return "; ".join(f"{p}: {text}" for p, text in PRECISIONS.items()) + f"; {GUIDANCE_PRECISIONS}. {BF16}"


def describe_processor() -> str:
    return "where the stage ran: " + "; ".join(f"{p}: {text}" for p, text in PROCESSORS.items())


def schema_document(doc: Mapping) -> dict:
    """The capture-2 schema ``doc`` with every stage description, enum and
    the delegate's precision description taken from the tables above."""
    out = json.loads(json.dumps(doc))
    stage = out["$defs"]["stage"]["properties"]
    stage["precision"] = {"enum": list(PRECISIONS), "description": describe_precision()}
    stage["processor"] = {"enum": list(PROCESSORS), "description": describe_processor()}
    stage["ftz"] = {"type": ["boolean", "null"], "description": FTZ}
    for key, text in STAGES.items():
        out["properties"]["stages"]["properties"][key] = {"$ref": "#/$defs/stage", "description": text}
    delegate = out["properties"]["runtime"]["properties"]["delegate"]["properties"]["precision"]
    delegate["description"] = ("the delegate's CalculationsPrecision as refsd names it (version 1 bundles: every "
                               "model stage); " + "; ".join(f"{p}: {t.split(' (')[0]}" for p, t in PRECISIONS.items()))
    return out


def schema_path() -> Path:
    return Path(__file__).with_name("schema") / "capture-2.schema.json"


def schema_text() -> str:
    doc = json.loads(schema_path().read_text(encoding="utf-8"))
    return json.dumps(schema_document(doc), indent=2, ensure_ascii=False) + "\n"


def write_schema() -> Path:
    path = schema_path()
    path.write_text(schema_text(), encoding="utf-8")
    return path


def runtime_table() -> str:
    """The README's table: runtime -> what to declare."""
    lines = ["| runtime | text_encoder, unet, vae | guidance_scheduler | note |", "|---|---|---|---|"]
    lines += [f"| {r} | {m} | {g} | {n} |" for r, m, g, n in RUNTIMES]
    return "\n".join(lines) + "\n"


def refuse_bf16_precision(doc: Mapping) -> None:
    """bf16 declared as a stage's precision: one line with the fix, before the
    schema's generic enum message."""
    stages = doc.get("stages")
    if not isinstance(stages, Mapping):
        return
    for name, st in stages.items():
        if isinstance(st, Mapping) and str(st.get("precision", "")).lower() in ("bf16", "bfloat16"):
            raise ValueError(f"capture.json: stages.{name}.precision {st['precision']!r}: {BF16}")


def declared_stage(tensor_stage: str) -> str:
    """The ``stages`` key that declares how a tensor's stage ran (the
    scheduler's tensors belong to guidance_scheduler)."""
    return tensor_stage if tensor_stage in trace.MODELS else "guidance_scheduler"


# bf16 values widened to float32 have the low 16 bits zero; an fp16 value has them zero with probability 1/8, a
# float32 one 2^-16: 64 nonzero elements put a wrong call below 1e-57.
BF16_MIN_ELEMENTS = 64


def bf16_valued(a: np.ndarray) -> bool:
    """Every finite nonzero value of ``a`` is a bfloat16 (at least BF16_MIN_ELEMENTS of them)."""
    a = np.asarray(a)
    if a.dtype != np.float32:
        return False
    v = a[np.isfinite(a) & (a != 0)]
    return v.size >= BF16_MIN_ELEMENTS and not np.any(v.view(np.uint32) & np.uint32(0xFFFF))


def declaration_checks(tensors: Mapping[str, np.ndarray], stages: Mapping, request: Mapping,
                       scheduler_config) -> list[dict]:
    """Exact checks of the declaration against the boundary ``tensors``
    (certify's ``exact_checks``): a failed one is a tensor the declared
    precision cannot have produced, and says which declaration it matches.

    * bf16: a stage's output (``STAGE_OUTPUTS``: computed values, not a
      lookup of bf16-stored weights) holds bfloat16 values only.
    * guidance_scheduler: the device's latents at every step, recomputed from
      its own noise prediction and previous latents by refsd's guidance and
      scheduler step (``refsd.pipeline.guided_step``) in each precision and
      FTZ setting, match a coarser declaration bit for bit (16-bit where f32
      is declared, FTZ where it is declared off) and not the one declared
      (f32_f16 and f16 count as one here: calibrated alike). A device more
      precise than it declares is left to the floors, which it passes."""
    checks = []
    for stage, name in STAGE_OUTPUTS.items():
        if name in tensors and bf16_valued(tensors[name]):
            checks.append({"tensor": name, "passed": False, "declaration": f"stages.{stage}",
                           "detail": f"every value is a bfloat16 (the low 16 bits of each float32 are zero): "
                                     f"{stage} ran in bf16; the bundle declares {stages[stage].precision}. {BF16}"})
    match = _guidance_match(tensors, stages["guidance_scheduler"], request, scheduler_config)
    if match is not None:
        checks.append(match)
    return checks


# Each stage's first computed boundary tensor.
STAGE_OUTPUTS = {"text_encoder": trace.HIDDEN_STATES, "unet": trace.noise_pred(0),
                 "guidance_scheduler": trace.latents(0), "vae": trace.IMAGE}


def _guidance_match(tensors, declared, request: Mapping, scheduler_config) -> dict | None:
    from refsd.numerics import Precision  # noqa: PLC0415
    from refsd.pipeline import guided_step  # noqa: PLC0415
    from refsd.schedulers import make_scheduler  # noqa: PLC0415

    steps = int(request["steps"])
    wanted = [trace.LATENTS_INIT] + [n for i in range(steps) for n in (trace.noise_pred(i), trace.latents(i))]
    if any(n not in tensors for n in wanted):
        return None
    candidates = [("f32", False), ("f32_f16", False), ("f32_f16", True), ("f16", False), ("f16", True)]
    matched = []
    for precision, ftz in candidates:
        sched = make_scheduler(request["scheduler"], scheduler_config)
        sched.set_timesteps(steps)
        x = np.asarray(tensors[trace.LATENTS_INIT], np.float32)
        ok = True
        for i in range(steps):
            got = guided_step(sched, np.asarray(tensors[trace.noise_pred(i)], np.float32),
                              np.float32(request["guidance"]), i, x, Precision(precision, ftz))
            x = np.asarray(tensors[trace.latents(i)], np.float32)
            if not np.array_equal(got, x):
                ok = False
                break
        if ok:
            matched.append((precision, ftz))
    if not matched:
        return None
    sixteen = declared.precision != "f32"

    def as_declared(precision, ftz):
        return (precision != "f32") == sixteen and (declared.ftz is None or not sixteen or ftz == declared.ftz)

    def coarser(precision, ftz):  # than declared; a device more precise than it declares is not refused
        return (not sixteen and precision != "f32") or (sixteen and declared.ftz is False and ftz)

    if any(as_declared(*m) for m in matched) or not any(coarser(*m) for m in matched):
        return None
    precision, ftz = next(m for m in matched if coarser(*m))
    ftz_text = f", ftz {str(ftz).lower()}" if precision != "f32" else ""
    said = declared.precision
    if declared.ftz is not None and sixteen:
        said += f", ftz {str(declared.ftz).lower()}"
    return {"tensor": "scheduler latents", "passed": False, "declaration": "stages.guidance_scheduler",
            "detail": f"these latents match guidance and the scheduler in {precision}{ftz_text} bit for bit at "
                      f"every step; the bundle declares guidance_scheduler {said}: declare "
                      f"stages.guidance_scheduler.precision {precision!r}{ftz_text}"}
