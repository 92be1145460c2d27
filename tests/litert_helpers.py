"""LiteRT helpers the export tests share."""

from __future__ import annotations

import json

from ai_edge_litert.interpreter import Interpreter, OpResolverType


def manifest(folder) -> dict:
    return json.loads((folder / "refsd_export.json").read_text())


def interpreter(path, *, preserve: bool = False) -> Interpreter:
    """LiteRT's builtin CPU kernels, no default delegate (XNNPACK would make some intermediates unreadable)."""
    it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=preserve,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def run(folder, name, feeds, *, preserve: bool = False):
    """(output, interpreter) of ``folder/name.tflite`` on ``feeds`` (input name -> array)."""
    it = interpreter(folder / f"{name}.tflite", preserve=preserve)
    for d in it.get_input_details():
        it.set_tensor(d["index"], feeds[d["name"]])
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"]), it
