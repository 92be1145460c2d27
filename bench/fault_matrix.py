"""The fault matrix (issue 28): diffusers on PyTorch's CPU kernels as the
device, in fp16, on held-out tiny models, certified by ``refsd-validate``.

    python bench/fault_matrix.py --out /tmp/fault-matrix [--archs sd15,sd21] [--seeds 7,8,9] [--declared f32_f16,f16]

Per model (architecture x ``make_tiny`` seed, none of them a seed the floors
were tuned on), request (two: prompts, seeds, guidance) and declaration
(every stage ``f32_f16``, or every stage ``f16``), one correct fp16 device and
the faulty ones: ``examples/diffusers_capture.FAULTS`` (1 % attention
temperature from step 0 and from step 1, the UNet output +1 % and +0.3 % from
step 1, a timestep off by one) and a bf16 run declared as that fp16
declaration. Each device is captured (every intermediate for the correct device and
the attention faults) and certified (both modes); one JSON line per certificate goes to ``OUT/results.jsonl``
(a rerun skips what is there) and the table, with the goal's verdict per row,
to ``OUT/table.md``.

The goal: every correct device certified with k <= 3, every faulty one
rejected at the tensor its fault enters (the first attention of its step, the
step's noise prediction, the timesteps' exact check, the text encoder for bf16)
with k >= 6.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = {
    "A": dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry", seed=3, steps=3,
              guidance=7.5, height=64, width=64),
    "B": dict(prompt="a watercolor of a lighthouse at dusk", negative_prompt="", seed=11, steps=3, guidance=5.0,
              height=64, width=64),
}
FIRST_ATTENTION = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
GOAL_CORRECT_K = 3.0
GOAL_FAULT_K = 6.0


def load_example():
    spec = importlib.util.spec_from_file_location("diffusers_capture", ROOT / "examples" / "diffusers_capture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def devices(faults) -> dict[str, dict]:
    """Device name -> capture() keywords (the declaration is added per row)."""
    out = {"correct": dict(dtype="fp16")}
    out.update({f: dict(dtype="fp16", fault=f) for f in faults})
    out["bf16_as_declared"] = dict(dtype="bf16")
    return out


def where_it_enters(device: str, first_step: int | None) -> str:
    """The tensor a fault must be first found at, as a prefix of a tensor name or an exact check."""
    if device == "correct":
        return ""
    if device == "bf16_as_declared":
        return "text_encoder/"
    if device == "timestep_off_by_one":
        return "exact:scheduler/timesteps"
    if device.startswith("attention_scale"):
        return f"unet/step_{first_step}/{FIRST_ATTENTION}"
    return f"unet/step_{first_step}/noise_pred"


def judge_row(cert: dict, device: str, first_step: int | None) -> dict:
    ks = [t["k_needed"] for t in cert["tensors"]]
    worst = max((k if isinstance(k, (int, float)) else math.inf) for k in ks)
    first = cert["first_failure"]
    bad_exact = [c["tensor"] for c in cert["exact_checks"] if not c["passed"]]
    row = {"verdict": cert["verdict"], "worst_k": worst, "first_failure": first and first["tensor"],
           "first_k": first and first["k_needed"], "exact_failed": bad_exact,
           "resolution": cert["resolution"] and cert["resolution"]["gain_every_step"],
           "design": cert["rule"]["calibration_design"].split(":")[0]}
    want = where_it_enters(device, first_step)
    if device == "correct":
        row["goal"] = cert["verdict"] == "certified" and worst <= GOAL_CORRECT_K
    elif want.startswith("exact:"):
        row["goal"] = cert["verdict"] != "certified" and want[len("exact:"):] in bad_exact
    else:
        k = first["k_needed"] if first else 0.0
        k = math.inf if not isinstance(k, (int, float)) else k
        row["goal"] = cert["verdict"] != "certified" and first["tensor"].startswith(want) and k >= GOAL_FAULT_K
    row["want"] = want
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--archs", default="sd15,sd21")
    ap.add_argument("--seeds", default="7,8,9", help="make_tiny seeds (held out: not those the floors were tuned on)")
    ap.add_argument("--requests", default=",".join(REQUESTS))
    ap.add_argument("--declared", default="f32_f16,f16")
    ap.add_argument("--devices", default=None, help="comma-separated subset of the devices (default: all)")
    a = ap.parse_args()

    from refsd_validate.certify import certify  # noqa: PLC0415

    from refsd.tiny import make_tiny  # noqa: PLC0415

    example = load_example()
    all_devices = devices(example.FAULTS)
    wanted = a.devices.split(",") if a.devices else list(all_devices)
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results.jsonl"
    done = set()
    if results.exists():
        done = {tuple(json.loads(line)["key"]) for line in results.read_text().splitlines() if line.strip()}
    for seed in map(int, a.seeds.split(",")):  # a first seed on both architectures before the next seed
        for arch in a.archs.split(","):
            model = a.out / "models" / f"{arch}-{seed}"
            if not (model / "model_index.json").exists():
                make_tiny(model, arch, seed=seed)
            for req_name in a.requests.split(","):
                req = REQUESTS[req_name]
                for declared in a.declared.split(","):
                    for device in wanted:
                        key = [arch, seed, req_name, declared, device]
                        if tuple(key) in done:
                            continue
                        kw = all_devices[device]
                        first_step = example.FAULTS[kw["fault"]][1] if "fault" in kw else None
                        t0 = time.time()
                        # Intermediates where the tensor to find is inside a module (and for the correct device:
                        # every tensor judged is one more chance of a false rejection).
                        inside = device == "correct" or device.startswith("attention_scale")
                        bundle = example.capture(model, a.out / "bundles" / "-".join(map(str, key)), **req, **kw,
                                                 intermediates=inside, declare=declared)
                        t1 = time.time()
                        cert = certify(bundle, model, cache_dir=a.out / "cache").to_dict()
                        row = {"key": key, **judge_row(cert, device, first_step), "capture_s": round(t1 - t0, 1),
                               "certify_s": round(time.time() - t1, 1)}
                        with results.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    (a.out / "table.md").write_text(table(rows))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    def k(x):
        return "inf" if x is None or (isinstance(x, float) and math.isinf(x)) or isinstance(x, str) else f"{x:.2f}"

    lines = ["| arch | seed | request | declared | device | verdict | first failure | k there | worst k | "
             "resolution | goal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        arch, seed, req, declared, device = r["key"]
        first = r["first_failure"] or "-"
        if r["exact_failed"]:
            first = f"exact {', '.join(r['exact_failed'])}; {first}"
        res = "-" if r["resolution"] is None else f"{r['resolution']:.2%}"
        lines.append(f"| {arch} | {seed} | {req} | {declared} | {device} | {r['verdict']} | {first} | "
                     f"{k(r['first_k']) if r['first_failure'] else '-'} | {k(r['worst_k'])} | {res} | "
                     f"{'yes' if r['goal'] else 'NO'} |")
    met = sum(r["goal"] for r in rows)
    lines.append(f"\n{met} of {len(rows)} rows meet the goal (correct: certified, worst k <= {GOAL_CORRECT_K:g}; "
                 f"faulty: rejected first at the tensor the fault enters, k >= {GOAL_FAULT_K:g}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
