"""Edits of a converted .tflite flatbuffer, with the schema module LiteRT ships
(``ai_edge_litert.schema_py_generated``, object API: unpack, change, repack).

``expose_tensors``      make chosen tensors extra outputs of the first subgraph:
                        LiteRT's ``CompiledModel`` (the GPU accelerator) has no
                        preserve-all-tensors option, so an intermediate is readable
                        only as an output.
``widen_gather_tables`` in an fp16-weight export, give each GATHER its table as a
                        float32 constant instead of fp16 + DEQUANTIZE: the GPU
                        delegate folds the DEQUANTIZE and then refuses the GATHER
                        (``Input / output dtype mismatch``). The values are the
                        fp16 ones, widened exactly; the table takes twice the bytes.
"""

from __future__ import annotations

import numpy as np


def _schema():
    from ai_edge_litert import schema_py_generated as fb  # noqa: PLC0415

    return fb


def read_model(data: bytes):
    """The ``ModelT`` of .tflite bytes (ValueError if they are not one)."""
    fb = _schema()
    # A .tflite is a flatbuffer with file identifier "TFL3" at bytes 4..8.
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a .tflite file (no TFL3 flatbuffer identifier)")
    try:
        return fb.ModelT.InitFromObj(fb.Model.GetRootAs(data, 0))
    except Exception as e:  # noqa: BLE001 - a corrupt flatbuffer raises anything from struct to IndexError
        raise ValueError(f"corrupt .tflite ({type(e).__name__}: {e})") from None


def write_model(model) -> bytes:
    import flatbuffers  # noqa: PLC0415 (a dependency of ai-edge-litert)

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def expose_tensors(data: bytes, names) -> tuple[bytes, list[int]]:
    """(``data`` with the tensors named ``names`` made outputs of the first
    subgraph, and of its signature if it has one; for each name, the output
    position it is read at). A name that is already an output keeps its
    position, a repeated name shares one; an unknown name or an input is refused."""
    fb = _schema()
    model = read_model(data)
    graph = model.subgraphs[0]
    index = {_name(t): i for i, t in enumerate(graph.tensors)}
    outputs = [int(i) for i in graph.outputs]
    inputs = {int(i) for i in graph.inputs}
    added, positions = [], []
    for name in names:
        if name not in index:
            raise ValueError(f"no tensor named {name!r} in the model")
        i = index[name]
        if i in inputs:
            raise ValueError(f"tensor {name!r} is an input of the model")
        if i not in outputs:
            outputs.append(i)
            added.append(i)
        positions.append(outputs.index(i))
    graph.outputs = np.asarray(outputs, dtype=np.int32)
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0:
            for i in added:
                entry = fb.TensorMapT()
                entry.name, entry.tensorIndex = _name(graph.tensors[i]), i
                sig.outputs.append(entry)
    return write_model(model), positions


def widen_gather_tables(data: bytes) -> bytes:
    """``data`` with every GATHER whose table is the DEQUANTIZE of an fp16
    constant, read by nothing else, reading a float32 constant of the same
    values instead (the DEQUANTIZE dropped). The same bytes if there is none."""
    fb = _schema()
    model = read_model(data)
    graph = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    ops = graph.operators or []
    producer = {int(o): op for op in ops for o in op.outputs}
    readers: dict[int, int] = {}
    for op in ops:
        for i in op.inputs:
            readers[int(i)] = readers.get(int(i), 0) + 1
    dropped = []
    for op in ops:
        if codes[op.opcodeIndex] != fb.BuiltinOperator.GATHER:
            continue
        table = int(op.inputs[0])
        deq = producer.get(table)
        if deq is None or codes[deq.opcodeIndex] != fb.BuiltinOperator.DEQUANTIZE or readers[table] != 1:
            continue
        src = graph.tensors[int(deq.inputs[0])]
        buf = model.buffers[src.buffer]
        if src.type != fb.TensorType.FLOAT16 or buf.data is None or not len(buf.data):
            continue
        values = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), "<f2").astype("<f4")
        widened = fb.BufferT()
        widened.data = np.frombuffer(values.tobytes(), np.uint8)
        model.buffers.append(widened)
        graph.tensors[table].buffer = len(model.buffers) - 1  # the DEQUANTIZE's float32 output, now constant
        if readers[int(deq.inputs[0])] == 1:
            buf.data = None  # the fp16 copy is read by nothing now: do not ship both
        dropped.append(deq)
    if not dropped:
        return data
    graph.operators = [op for op in ops if not any(op is d for d in dropped)]
    return write_model(model)


__all__ = ["expose_tensors", "read_model", "widen_gather_tables", "write_model"]
