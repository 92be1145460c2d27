"""Where the running ops are: the module path, the pipeline stage and step;
and recording module outputs.

These two context variables are what lets a module call deep inside a model
be named ``unet/step_3/unet.mid_block.attentions.0`` without threading a name
through every op signature. The exception monitor (``refsd.monitor``) and the
capture tooling read them; the models set them (``scope``, ``location``) and
``Module.__call__`` feeds ``record``, which stores into the recorder of the
run's settings (``refsd.numerics.RunSettings.recorder``, set by ``recording``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

from refsd.numerics import current_settings, run_settings

_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("refsd_path", default=())
_WHERE: contextvars.ContextVar[tuple[str | None, int | None]] = contextvars.ContextVar(
    "refsd_where", default=(None, None)
)


@contextlib.contextmanager
def scope(name: str) -> Iterator[str]:
    """Append ``name`` (dotted allowed) to the module path of the enclosed ops."""
    token = _PATH.set(_PATH.get() + (name,) if name else _PATH.get())
    try:
        yield current_path()
    finally:
        _PATH.reset(token)


def current_path() -> str:
    return ".".join(_PATH.get())


def current_location() -> tuple[str | None, int | None]:
    """The (stage, step) set by the innermost ``location``."""
    return _WHERE.get()


def tensor_name(path: str) -> str:
    """The capture-bundle name of a module output at the current location:
    ``{stage}/step_{i}/{module path}`` (``{stage}/{module path}`` outside the
    denoising loop), e.g. ``unet/step_3/unet.mid_block.attentions.0``."""
    stage, step = _WHERE.get()
    prefix = stage or path.split(".", 1)[0]
    return f"{prefix}/step_{step}/{path}" if step is not None else f"{prefix}/{path}"


@contextlib.contextmanager
def recording(into: dict | None = None) -> Iterator[dict]:
    """Collect every module's output (``Module.__call__``) into a dict keyed by
    ``tensor_name``: the reference side of a capture's intermediates. A module
    called twice at one location keeps its first output and the second goes
    under ``name#1`` (and so on), so nothing is silently overwritten."""
    store = into if into is not None else {}
    with run_settings(recorder=store):
        yield store


def record(path: str, value) -> None:
    """Store a module output if a ``recording()`` is active (cheap otherwise).
    Only tensor outputs are kept (down blocks return ``(x, skips)`` tuples;
    their tensors are recorded by the modules inside)."""
    store = current_settings().recorder
    if store is None or not path or not hasattr(value, "shape"):
        return
    name = tensor_name(path)
    key, k = name, 0
    while key in store:
        k += 1
        key = f"{name}#{k}"
    store[key] = value


@contextlib.contextmanager
def location(stage: str | None = None, step: int | None = None) -> Iterator[None]:
    """Tag the enclosed ops with a pipeline stage and denoising step."""
    token = _WHERE.set((stage, step))
    try:
        yield
    finally:
        _WHERE.reset(token)
