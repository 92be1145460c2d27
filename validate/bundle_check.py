"""``refsd-validate check`` and ``refsd-validate names``: what a bundle holds
and what certify will judge, without rerunning the reference.

``check BUNDLE [--model DIR]``: the bundle is read as certify reads it
(schema, files, sha256 of every tensor, dtypes, boundary shapes against the
model's configs), the model hash is compared, and each intermediate is
sorted into "judged" (the reference records that module: ``refsd.names``)
or "not judged" (unknown to the reference, or marked not observable by the
capture). Exit 0 if certify can run on it, 2 otherwise.

``names --model DIR``: every name the reference records, with shape, layout
and meaning (one denoising step is run for the shapes).
"""

from __future__ import annotations

import json
from pathlib import Path

from refsd import trace
from refsd_validate.bundle import model_sha256
from refsd_validate.reader import BundleError, ModelGeometry, read_bundle


def check_bundle(bundle_path: str | Path, model_dir: str | Path | None = None) -> list[str]:
    """Report lines for a bundle certify can run on; ``BundleError`` (one line) if it cannot."""
    geometry = ModelGeometry.from_dir(model_dir) if model_dir is not None else None
    b = read_bundle(bundle_path, geometry)
    doc = b.capture
    lines = [f"{b.source}: schema version {doc['schema_version']}, {len(doc['tensors'])} tensors, every file "
             "present with the sha256 capture.json records"]
    stages = b.stages
    lines.append("stages: " + "; ".join(
        f"{s} {d['processor']} {d['precision']}" + ("" if d["ftz"] is None else f" ftz={d['ftz']}")
        + (f" int8 {d['int8_kernels']}" if d["int8_kernels"] else "") for s, d in stages.items()))
    lines.append(f"deployment: weights {doc['model'].get('weights', 'fp32')}, rewrites {doc['model'].get('rewrites', 'none')}")
    if trace.TIMESTEPS not in b.tensors:
        lines.append("not checked by certify: scheduler/timesteps is missing (the timestep check is skipped)")
    not_observable = set(doc.get("observability", {}).get("not_observable", [])) & set(b.intermediates)
    if model_dir is None:
        lines.append(f"{len(b.intermediates)} intermediates; pass --model to check the model hash, boundary shapes "
                     "and which intermediates the reference records")
        return lines
    sha = model_sha256(model_dir)
    if doc["model"]["sha256"] != sha:
        raise BundleError(f"bundle was captured from model sha256 {doc['model']['sha256'][:16]}..., but "
                          f"{model_dir} is {sha[:16]}...: not the same model")
    lines.append(f"model {model_dir}: sha256 matches; boundary tensors have the shapes its configs imply")
    from refsd.names import is_recorded, module_paths  # noqa: PLC0415

    paths = module_paths(model_dir)
    unknown = sorted(n for n in b.intermediates if not is_recorded(n, paths))
    judged = len(b.intermediates) - len(unknown) - len(not_observable - set(unknown))
    lines.append(f"intermediates: {judged} judged by certify, {len(unknown)} unknown to the reference (listed and "
                 f"skipped; --strict refuses them), {len(not_observable)} marked not observable by the capture")
    lines += [f"  unknown: {n}" for n in unknown[:20]]
    if len(unknown) > 20:
        lines.append(f"  ... and {len(unknown) - 20} more")
    return lines


def add_parsers(sub) -> None:
    p = sub.add_parser("check", help="check a bundle without rerunning anything",
                       description="Read a capture bundle as certify would (schema, files, sha256, dtypes, shapes "
                       "against the model) and say what certify will and will not compare. Exit 0 or 2.")
    p.add_argument("bundle", metavar="BUNDLE", help="capture bundle: directory or .zip")
    p.add_argument("--model", metavar="DIR", help="the diffusers folder it was captured from")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("names", help="list the tensor names the reference records for a model",
                       description="Every boundary tensor and module output the reference records, with shape, "
                       "layout and meaning: the names a bundle from any runtime uses. Runs one denoising step.")
    p.add_argument("--model", required=True, metavar="DIR", help="diffusers folder")
    p.add_argument("--steps", type=int, default=1, help="steps of the request (names repeat per step; default 1)")
    p.add_argument("--height", type=int, default=512, help="image height (default 512)")
    p.add_argument("--width", type=int, default=512, help="image width (default 512)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_names)


def _cmd_check(args) -> int:
    for line in check_bundle(args.bundle, args.model):
        print(line)
    print("OK: certify can run on this bundle")
    return 0


def _cmd_names(args) -> int:
    from refsd.names import recorded_names  # noqa: PLC0415

    if not 1 <= args.steps <= 1000:
        raise BundleError(f"--steps must be in [1, 1000], got {args.steps}")
    for opt in ("height", "width"):
        v = getattr(args, opt)
        if not 8 <= v <= 4096:
            raise BundleError(f"--{opt} must be in [8, 4096], got {v}")
    if not (Path(args.model) / "model_index.json").is_file():
        raise BundleError(f"--model {args.model}: not a diffusers folder (no model_index.json)")
    infos = recorded_names(args.model, steps=args.steps, height=args.height, width=args.width)
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=1))
        return 0
    for i in infos:
        print(f"{i.name}\t{'x'.join(map(str, i.shape))}\t{i.layout}\t{i.meaning}")
    return 0
