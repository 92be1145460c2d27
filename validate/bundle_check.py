"""What a bundle holds and what certify will judge, without rerunning the
reference (``refsd-validate check`` and ``refsd-validate names``).

``check BUNDLE [--model DIR]``: the bundle is read as certify reads it
(schema, files, sha256 of every tensor, dtypes, boundary shapes against the
model's configs), the model hash is compared, each intermediate is sorted
into "judged" (the reference records that module: ``refsd.names``) or "not
judged" (unknown to the reference, or marked not observable by the
capture), and each judged one's shape and layout is checked against what the
reference records at the request's size (``bundle.check_intermediate_shapes``:
one f32 denoising step is run for the shapes, as ``names`` does; write_bundle
refuses the same tensors with the same message). Exit 0 if certify can run on
it, 2 otherwise.

``names --model DIR``: every name the reference records, with shape, layout
and meaning (one denoising step is run for the shapes).
"""

from __future__ import annotations

from pathlib import Path

from refsd_validate.bundle import BundleError, ModelGeometry, check_intermediate_shapes, model_sha256
from refsd_validate.reader import read_bundle

from refsd import trace


def check_bundle(bundle_path: str | Path, model_dir: str | Path | None = None) -> list[str]:
    """Report lines for a bundle certify can run on; ``BundleError`` (one line) if it cannot."""
    geometry = ModelGeometry.from_dir(model_dir) if model_dir is not None else None
    b = read_bundle(bundle_path, geometry)
    doc = b.capture
    lines = [f"{b.source}: schema version {doc['schema_version']}, {len(doc['tensors'])} tensors, every file "
             "present with the sha256 capture.json records"]
    stages = b.stages
    lines.append("stages: " + "; ".join(
        f"{s} {d.processor} {d.precision}" + ("" if d.ftz is None else f" ftz={d.ftz}")
        + (f" int8 {d.int8_kernels}" if d.int8_kernels else "") for s, d in stages.items()))
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
    judged_names = [n for n in b.intermediates if n not in unknown and n not in not_observable]
    check_intermediate_shapes({n: doc["tensors"][n]["shape"] for n in judged_names}, doc["request"], model_dir)
    if judged_names:
        lines.append(f"intermediates: every judged one has the shape and layout (NHWC) the reference records at "
                     f"{doc['request']['height']}x{doc['request']['width']}")
    return lines
