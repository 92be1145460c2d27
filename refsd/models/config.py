"""The config idiom: a frozen dataclass per ``config.json``, built with
:func:`config_from_dict` (the models' ``UNetConfig``, ``VaeConfig``,
``ClipTextConfig`` and the schedulers' configs).

A config dataclass (``UNetConfig``, ``VaeConfig``, ``ClipTextConfig``) already
says, field by field, what type a ``config.json`` value has and what its
default is; :func:`config_schema` turns that into a JSON Schema so a config is
checked by ``jsonschema`` (the library the capture bundle is checked with)
before any model is built from it:

* ``int`` fields are JSON integers in [1, ``MAX_INT``] (channels, layers,
  groups, heads and sizes; 0 groups or 0 layers is no model), or the range in
  ``INT_RANGES`` (repeat counts are bounded tightly: a million layers per block
  would build a million modules before any weight is checked); a float such
  as ``2.0`` is not an integer here (jsonschema's own checker would accept it);
* ``float`` fields are finite JSON numbers (non-finite ones never get past
  :func:`refsd.safe_io.parse_json`), ``> 0`` for the epsilons and scale factors
  in ``POSITIVE``, in ``FLOAT_RANGES`` where given;
* ``tuple`` fields are arrays of 1 to ``MAX_ITEMS`` items of the default's item
  type (``block_out_channels``: integers, ``down_block_types``: strings);
* ``bool`` and ``str`` fields are JSON booleans and strings; ``| None`` adds null.

Keys a dataclass does not have are not checked (diffusers configs carry many
that SD does not use); the dataclass's ``__post_init__`` checks what holds
between fields. A dataclass with ``SCHEMA = False`` (the schedulers' configs)
has no JSON Schema: its ``__post_init__`` checks every field itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from refsd.safe_io import check_schema

MAX_INT = 1 << 20  # SD's largest size is CLIP's vocabulary (49408)
MAX_ITEMS = 8  # SD has 4 blocks
# SD 2.x: 2 layers per block, 23 text layers; diffusers pads with 0 or 1.
INT_RANGES = {"layers_per_block": (1, 16), "transformer_layers_per_block": (1, 16), "num_hidden_layers": (1, 128),
              "downsample_padding": (0, 1)}
POSITIVE = frozenset({"norm_eps", "layer_norm_eps", "scaling_factor"})
FLOAT_RANGES = {"freq_shift": (0, 1)}  # diffusers' sinusoidal embedding shift: 0 (SD) or 1

_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "None": "null"}


def _int_schema(name: str) -> dict:
    lo, hi = INT_RANGES.get(name, (1, MAX_INT))
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _item_schema(name: str, item) -> dict:
    if isinstance(item, bool):
        return {"type": "boolean"}
    if isinstance(item, int):
        return _int_schema(name)
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
            alternatives.append({"type": "array", "minItems": 1, "maxItems": MAX_ITEMS,
                                 "items": _item_schema(f.name, item)})
        elif kind == "int":
            alternatives.append(_int_schema(f.name))
        elif kind == "float":
            bounds = {"minimum": FLOAT_RANGES[f.name][0], "maximum": FLOAT_RANGES[f.name][1]} \
                if f.name in FLOAT_RANGES else {"exclusiveMinimum": 0} if f.name in POSITIVE else {}
            alternatives.append({"type": "number", **bounds})
        elif kind in _TYPES:
            alternatives.append({"type": _TYPES[kind]})
        else:  # pragma: no cover - a dataclass field of a type this module does not map
            raise TypeError(f"config field {f.name}: no JSON Schema for type {kind!r}")
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


@functools.lru_cache(maxsize=None)
def config_schema(cls) -> dict:
    """The JSON Schema of a config dataclass's ``config.json`` (any object under ``SCHEMA = False``)."""
    if not getattr(cls, "SCHEMA", True):
        return {"type": "object"}
    return {"type": "object",
            "properties": {f.name: _field_schema(f) for f in dataclasses.fields(cls) if not f.name.startswith("_")}}


def config_from_dict(cls, d: Mapping[str, Any], *, required: tuple[str, ...] = (), source: str = "config"):
    """A frozen config dataclass from a ``config.json`` dict: checked against
    :func:`config_schema`, keys the dataclass does not have are ignored,
    ``required`` keys must be present, lists become tuples."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{source}: missing required key{'s' * (len(missing) != 1)} {', '.join(missing)}")
    if getattr(cls, "SCHEMA", True):
        check_schema(d, config_schema(cls), source)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: freeze(v) for k, v in d.items() if k in names}
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def freeze(v):
    """A JSON value with every list a tuple (hashable, as a frozen dataclass field)."""
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    return v
