"""JSON Schemas of the model configs, derived from the config dataclasses.

A config dataclass (``UNetConfig``, ``VaeConfig``, ``ClipTextConfig``) already
says, field by field, what type a ``config.json`` value has and what its
default is; :func:`config_schema` turns that into a JSON Schema so a config is
checked by ``jsonschema`` (the library the capture bundle is checked with)
before any model is built from it:

* ``int`` fields are JSON integers >= 1 (channels, layers, groups, heads and
  sizes; 0 groups or 0 layers is no model), except those in ``NONNEGATIVE``;
  a float such as ``2.0`` is not an integer here (jsonschema's own checker
  would accept it);
* ``float`` fields are finite JSON numbers (non-finite ones never get past
  :func:`refsd.safe_io.parse_json`), ``> 0`` for the epsilons and scale factors
  in ``POSITIVE``;
* ``tuple`` fields are non-empty arrays whose items have the default's item type
  (``block_out_channels``: integers >= 1, ``down_block_types``: strings);
* ``bool`` and ``str`` fields are JSON booleans and strings; ``| None`` adds null.

Keys a dataclass does not have are not checked (diffusers configs carry many
that SD does not use); the dataclass's ``__post_init__`` checks what holds
between fields.
"""

from __future__ import annotations

import dataclasses
import functools

NONNEGATIVE = frozenset({"downsample_padding"})
POSITIVE = frozenset({"norm_eps", "layer_norm_eps", "scaling_factor"})

_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "None": "null"}


def _item_schema(name: str, item) -> dict:
    if isinstance(item, bool):
        return {"type": "boolean"}
    if isinstance(item, int):
        return {"type": "integer", "minimum": 0 if name in NONNEGATIVE else 1}
    if isinstance(item, float):
        return {"type": "number"}
    if isinstance(item, str):
        return {"type": "string"}
    return {}


def _field_schema(f: dataclasses.Field) -> dict:
    kinds = [k.strip() for k in str(f.type).split("|")]
    default = f.default
    item = default[0] if isinstance(default, tuple) and default else default
    alternatives = []
    for kind in kinds:
        if kind == "tuple":
            alternatives.append({"type": "array", "minItems": 1, "items": _item_schema(f.name, item)})
        elif kind == "int":
            alternatives.append({"type": "integer", "minimum": 0 if f.name in NONNEGATIVE else 1})
        elif kind == "float":
            alternatives.append({"type": "number", **({"exclusiveMinimum": 0} if f.name in POSITIVE else {})})
        elif kind in _TYPES:
            alternatives.append({"type": _TYPES[kind]})
        else:  # pragma: no cover - a dataclass field of a type this module does not map
            raise TypeError(f"config field {f.name}: no JSON Schema for type {kind!r}")
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


@functools.lru_cache(maxsize=None)
def config_schema(cls) -> dict:
    """The JSON Schema of a config dataclass's ``config.json``."""
    return {"type": "object",
            "properties": {f.name: _field_schema(f) for f in dataclasses.fields(cls) if not f.name.startswith("_")}}
