"""``refsd golden make|verify``: the golden regression set, generated, never hand-edited.

    golden/
      MANIFEST.sha256        ``sha256  path`` per file (sha256sum format); verify fails on any changed byte
      recipe.json            how every file was made: refsd version, ops, modes, requests, model sha256s
      ops/{op}.npz           inputs ``in_{i}`` (fp16-representable, seeded) and outputs ``out_{mode}`` per mode
      traces/{arch}_{mode}.npz   boundary tensors of a tiny model's pipeline run (refsd.tiny, seed 0)

Modes: f32, f32_f16, f16 and f16 with FTZ (accumulation block 32). The .npz
files are written deterministically (fixed zip timestamps, sorted members), so
``make`` twice gives identical bytes and ``git diff`` shows only real changes.
Tests read golden data through :func:`load`, which checks the file against
the manifest first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from refsd import __version__, ops
from refsd.trace import TIMESTEPS
from refsd.numerics import precision, round_f16
from refsd.safe_io import read_json, read_text, sha256_file

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "golden"  # the repository's top-level golden/
MANIFEST = "MANIFEST.sha256"
MAX_MANIFEST_BYTES = 1 << 20  # 24 lines today
OP_MODES = {"f32": ("f32", False), "f32_f16": ("f32_f16", False), "f16": ("f16", False), "f16_ftz": ("f16", True)}
TRACE_REQUEST = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 0, "steps": 3,
                 "guidance": 7.5, "scheduler": "ddim", "height": 32, "width": 32}
TRACE_MODES = ("f32", "f32_f16")
ARCHES = ("sd15", "sd21")
TRACE_MODEL_RECIPE = "refsd.tiny.make_tiny(DIR, arch, seed=0)"


def _inputs(rng: np.random.Generator) -> dict[str, tuple[Callable, tuple, dict]]:
    """One representative call per op family, on seeded fp16-representable inputs."""
    def f16(shape, scale=1.0, loc=0.0):
        return round_f16(rng.normal(loc, scale, shape).astype(np.float32))

    x4, w3, b4 = f16((1, 6, 6, 8)), f16((3, 3, 8, 4), 0.3), f16((4,))
    xl, wl, bl = f16((2, 5, 16)), f16((12, 16), 0.25), f16((12,))
    g, be = f16((16,), 0.2, 1.0), f16((16,))
    g8, be8 = f16((8,), 0.2, 1.0), f16((8,))
    q, k, v = f16((2, 6, 16)), f16((2, 7, 16)), f16((2, 7, 16))
    big = f16((2, 5, 16), 4.0)  # activations in the range where GELU / softmax round visibly
    qi, sc = ops.quantize_int8(wl)
    return {
        "conv2d": (ops.conv2d, (x4, w3, b4), {"padding": 1}),
        "conv2d_winograd": (ops.conv2d_winograd, (x4, w3, b4), {"padding": 1}),
        "linear": (ops.linear, (xl, wl, bl), {}),
        "group_norm": (ops.group_norm, (x4, g8, be8), {"num_groups": 2}),
        "group_norm_fused": (ops.group_norm_fused, (x4, g8, be8), {"num_groups": 2}),
        "layer_norm": (ops.layer_norm, (xl, g, be), {}),
        "silu": (ops.silu, (big,), {}),
        "gelu": (ops.gelu, (big,), {}),
        "gelu_tanh": (ops.gelu, (big,), {"approximate": "tanh"}),
        "quick_gelu": (ops.quick_gelu, (big,), {}),
        "geglu": (ops.geglu, (xl,), {}),
        "softmax": (ops.softmax, (big,), {}),
        "attention": (ops.attention, (q, k, v), {"heads": 2}),
        "flash_attention": (ops.flash_attention, (q, k, v), {"heads": 2}),
        "upsample_nearest2x": (ops.upsample_nearest2x, (x4,), {}),
        "timestep_embedding": (ops.timestep_embedding, (np.array([1.0, 500.0, 981.0], np.float32),), {"dim": 16}),
        "dequantize_int8": (ops.dequantize_int8, (qi, sc), {}),
        "add": (ops.add, (xl, bl[:1]), {}),
        "mul": (ops.mul, (xl, big), {}),
    }


def op_vectors(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """op -> {"in_0": ..., "out_f32": ..., ...}: the op run on the same inputs in every mode."""
    out = {}
    for name, (fn, args, kwargs) in _inputs(np.random.default_rng(seed)).items():
        arrays = {f"in_{i}": np.asarray(a) for i, a in enumerate(args)}
        for mode, (m, ftz) in OP_MODES.items():
            with precision(m, ftz=ftz, block=32):
                arrays[f"out_{mode}"] = np.asarray(fn(*args, **kwargs))
        out[name] = arrays
    return out


def _tiny(workdir: Path, arch: str) -> tuple[Path, str]:
    """The tiny model a trace runs on (TRACE_MODEL_RECIPE) and its sha256."""
    from refsd.tiny import make_tiny  # noqa: PLC0415
    from refsd.weights import model_sha256  # noqa: PLC0415

    model = make_tiny(workdir / arch, arch, seed=0)
    return model, model_sha256(model)


def traces(workdir: Path) -> dict[str, tuple[dict[str, np.ndarray], str]]:
    """"{arch}_{mode}" -> (boundary trace, model sha256) of each tiny model's run of TRACE_REQUEST."""
    from refsd.pipeline import Pipeline, Request  # noqa: PLC0415

    out = {}
    for arch in ARCHES:
        model, sha = _tiny(workdir, arch)
        for mode in TRACE_MODES:
            result = Pipeline(model, precision=mode)(Request(**TRACE_REQUEST), progress=False)
            # The float boundary tensors; the integer timesteps are the scheduler tests' business.
            out[f"{arch}_{mode}"] = ({n: v for n, v in result.trace.items() if n != TIMESTEPS}, sha)
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic .npz: sorted members, fixed timestamps, no pickles."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.save(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def recipe(trace_models: dict[str, str]) -> dict:
    """recipe.json: how every file is made (the code's constants) and the sha256 of each trace's model."""
    return {"generator": "refsd golden make", "refsd_version": __version__, "op_modes": OP_MODES,
            "op_seed": 0, "trace_request": TRACE_REQUEST, "trace_models": trace_models,
            "trace_model_recipe": TRACE_MODEL_RECIPE}


def trace_model_shas(workdir: Path) -> dict[str, str]:
    """``{arch}_{mode}`` -> the sha256 of the tiny model that trace is run on."""
    shas = {arch: _tiny(workdir, arch)[1] for arch in ARCHES}
    return {f"{arch}_{mode}": shas[arch] for arch in ARCHES for mode in TRACE_MODES}


def make(out: str | Path = DEFAULT_DIR) -> Path:
    """Regenerate every golden file and the manifest into ``out`` (replacing what the manifest lists), each
    written to a temporary file and renamed. Refuses a folder holding a symlink (never written through)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--dir {out}: exists and is not a folder")
    for folder, dirs, names in os.walk(out):  # before any work: nothing is ever written through a link
        link = next((Path(folder) / n for n in sorted(dirs + names) if (Path(folder) / n).is_symlink()), None)
        if link is not None:
            raise ValueError(f"{link}: a symlink in the golden folder; refusing to write through it")
    files: dict[str, bytes] = {}
    for name, arrays in op_vectors().items():
        files[f"ops/{name}.npz"] = npz_bytes(arrays)
    with tempfile.TemporaryDirectory() as tmp:
        trace_models = {}
        for key, (trace, sha) in traces(Path(tmp)).items():
            files[f"traces/{key}.npz"] = npz_bytes(trace)
            trace_models[key] = sha
    files["recipe.json"] = (json.dumps(recipe(trace_models), indent=2, sort_keys=True) + "\n").encode()
    old = manifest_entries(out) if (out / MANIFEST).is_file() else {}
    for rel in old:
        if rel not in files and (out / rel).is_file():
            (out / rel).unlink()  # a file the new recipe no longer makes
    manifest = "".join(f"{hashlib.sha256(files[rel]).hexdigest()}  {rel}\n" for rel in sorted(files))
    for rel, data in [*files.items(), (MANIFEST, manifest.encode())]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        tmp = out / f"{rel}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / rel)
    return out


def manifest_entries(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file ``root``'s manifest lists."""
    path = root / MANIFEST
    if not os.path.lexists(path):
        raise FileNotFoundError(2, "no golden manifest", str(path))
    entries = {}
    for n, line in enumerate(read_text(path, max_bytes=MAX_MANIFEST_BYTES).splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or ".." in Path(rel).parts or Path(rel).is_absolute() or rel in entries:
            raise ValueError(f"{path}:{n}: not a 'sha256  path' line naming a new file under the folder")
        entries[rel] = digest
    return entries


def verify(root: str | Path = DEFAULT_DIR) -> list[str]:
    """Problems found in the files' contents (empty: every byte as the manifest
    says, and recipe.json true of the models it names). A folder that is not
    the manifest's (a listed file missing, an unlisted file, a symlink or
    other non-regular file anywhere) raises ``ValueError`` naming the first
    such path: nothing in it is read, links are never followed."""
    root = Path(root)
    entries = manifest_entries(root)
    _check_layout(root, entries)
    problems = []
    for rel, digest in entries.items():
        if sha256_file(root / rel) != digest:
            problems.append(f"{rel}: sha256 differs from {MANIFEST} (changed by hand or by a code change: "
                            "regenerate with `refsd golden make` and review the diff)")
    if "recipe.json" in entries:
        problems += _recipe_problems(root / "recipe.json")
    return problems


def _check_layout(root: Path, entries: dict[str, str]) -> None:
    found, odd = set(), []
    for folder, dirs, names in os.walk(root):  # symlinked folders are listed, never entered
        for name in sorted(dirs + names):
            p = Path(folder) / name
            rel = p.relative_to(root).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                odd.append(f"{root / rel}: a symlink in the golden folder (never followed)")
            elif stat.S_ISREG(mode):
                found.add(rel)
            elif not stat.S_ISDIR(mode):
                odd.append(f"{root / rel}: not a regular file")
    odd += [f"{root / rel}: listed in {MANIFEST} but missing" for rel in entries if rel not in found]
    odd += [f"{root / rel}: not in {MANIFEST}" for rel in sorted(found - set(entries) - {MANIFEST})]
    if odd:
        more = f" (and {len(odd) - 1} more: {'; '.join(odd[1:4])}{'; ...' if len(odd) > 4 else ''})" if odd[1:] else ""
        raise ValueError(odd[0] + more)


def _recipe_problems(path: Path) -> list[str]:
    """recipe.json against the code that makes the files and the models it names (remade: seconds)."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        return ["recipe.json: not a JSON object"]
    with tempfile.TemporaryDirectory() as tmp:
        want = json.loads(json.dumps(recipe(trace_model_shas(Path(tmp)))))  # tuples as JSON has them
    problems = []
    for key in sorted(set(want) | set(doc)):
        if doc.get(key) != want.get(key):
            what = "model sha256s" if key == "trace_models" else repr(key)
            problems.append(f"recipe.json: {what} differ from what `refsd golden make` records today "
                            f"({json.dumps(doc.get(key))[:200]} recorded, {json.dumps(want.get(key))[:200]} now): "
                            "regenerate with `refsd golden make` and review the diff")
    return problems


def load(rel: str, root: str | Path = DEFAULT_DIR) -> dict[str, np.ndarray]:
    """A golden .npz (``"ops/conv2d.npz"``), after checking its sha256 against the manifest."""
    root = Path(root)
    digest = manifest_entries(root).get(rel)
    if digest is None:
        raise KeyError(f"{rel} is not in {root / MANIFEST}")
    data = (root / rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{root / rel}: sha256 differs from the manifest; refusing to use it")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {n: z[n] for n in z.files}
