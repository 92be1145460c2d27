"""The scheduler configs: a frozen dataclass per sampler, built from a
diffusers folder's ``scheduler/scheduler_config.json`` with ``config_from_dict``
(the idiom of the model configs, ``refsd.models.config``): a field per key
``refsd.schedulers`` reads, with the diffusers class's default, and in its
metadata what is supported; ``__post_init__`` checks every field against it
(``_check``), in one place, naming the key and the value it refuses."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np

__all__ = ["SchedulerConfig", "DDIMConfig", "EulerConfig", "DPMSolverConfig"]

_SPACINGS = ("leading", "trailing", "linspace")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _key(default, kind: str, arg=None):
    """A config field: its default and what is supported (``kind`` and its ``arg``, see ``_check``)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "arg": arg})


def _check(key: str, value, kind: str, arg):
    """``value`` of config key ``key`` normalized, or a ValueError naming key and value. Kinds:
    ``choice`` (one of the strings ``arg``), ``only`` (the single supported value ``arg``; diffusers
    treats null like false for the flags whose only value is false), ``bool`` (``arg``: null allowed,
    read as false), ``count`` (an integer in [1, ``arg``]), ``int``, ``positive`` (a number > 0;
    ``arg``: null allowed), ``beta`` (a number in (0, 1)), ``lambda`` (a number, -inf allowed),
    ``betas`` (null, or a non-empty list of numbers in (0, 1))."""

    def bad(why: str):
        return ValueError(f"{key}={_as_written(value)!r} is not supported: {why}")

    if value is None:
        if kind in ("bool", "positive") and arg or kind == "betas" or (kind == "only" and arg is None):
            return False if kind == "bool" else None
        if kind == "only" and arg is False:
            return False
        raise bad("expected a value, got null")
    if kind == "only":
        if isinstance(arg, bool):
            ok = isinstance(value, (bool, np.bool_)) and bool(value) == arg
        elif isinstance(arg, int):
            ok = _is_int(value) and int(value) == arg
        else:
            ok = isinstance(value, str) and value == arg
        if not ok:
            raise bad(f"only {arg!r} is implemented")
        return arg
    if kind == "choice":
        if not isinstance(value, str) or value not in arg:
            raise bad(f"expected one of {', '.join(map(repr, arg))}")
        return value
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise bad("expected true or false")
        return bool(value)
    if kind == "int":
        if not _is_int(value):
            raise bad("expected an integer")
        return int(value)
    if kind == "count":
        if not _is_int(value) or not 1 <= value <= arg:
            raise bad(f"expected a positive integer <= {arg}")
        return int(value)
    if kind in ("positive", "beta"):  # a negative beta makes sqrt(beta) complex; beta >= 1 kills alpha
        hi = 1.0 if kind == "beta" else math.inf
        if not _is_number(value) or not 0 < float(value) < hi:
            raise bad("expected a number in (0, 1)" if kind == "beta" else "expected a finite number > 0")
        return float(value)
    if kind == "lambda":
        if not _is_number(value) or math.isnan(float(value)) or float(value) == math.inf:
            raise bad("expected a number")
        return float(value)
    assert kind == "betas", kind
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise bad("expected a list of numbers") from None
    if arr.ndim != 1 or arr.size == 0 or not np.all((arr > 0) & (arr < 1)):
        raise bad("expected a non-empty list of numbers in (0, 1)")
    return tuple(float(b) for b in arr.astype(np.float32))


def _as_written(v):
    """A config value as the JSON had it (``config_from_dict`` made its lists tuples)."""
    return [_as_written(x) for x in v] if isinstance(v, tuple) else v


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The keys every scheduler reads. ``SCHEMA = False``: ``config_from_dict`` leaves the checks
    to ``__post_init__``, which names the key and value in the scheduler's own words."""

    SCHEMA: ClassVar[bool] = False

    # SD trains on 1000; the bound keeps a hostile config from allocating a schedule of 10^12 betas
    num_train_timesteps: int = _key(1000, "count", 100_000)
    beta_start: float = _key(0.0001, "beta")
    beta_end: float = _key(0.02, "beta")
    beta_schedule: str = _key("linear", "choice", _BETA_SCHEDULES)
    trained_betas: tuple | None = _key(None, "betas")  # float32 values (as a tuple: the config is frozen)
    prediction_type: str = _key("epsilon", "choice", _PREDICTION_TYPES)
    steps_offset: int = _key(0, "int")
    rescale_betas_zero_snr: bool = _key(False, "only", False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name), f.metadata["kind"],
                                                    f.metadata["arg"]))
        betas = self.trained_betas
        if betas is not None and len(betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(betas)} values but "
                             f"num_train_timesteps={self.num_train_timesteps}")


@dataclasses.dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    timestep_spacing: str = _key("leading", "choice", _SPACINGS)
    clip_sample: bool = _key(True, "bool")
    clip_sample_range: float = _key(1.0, "positive")
    set_alpha_to_one: bool = _key(True, "bool")
    thresholding: bool = _key(False, "only", False)


@dataclasses.dataclass(frozen=True)
class EulerConfig(SchedulerConfig):
    timestep_spacing: str = _key("linspace", "choice", _SPACINGS)
    interpolation_type: str = _key("linear", "only", "linear")
    timestep_type: str = _key("discrete", "only", "discrete")
    final_sigmas_type: str = _key("zero", "choice", ("zero", "sigma_min"))
    use_karras_sigmas: bool = _key(False, "bool", True)
    use_exponential_sigmas: bool = _key(False, "only", False)
    use_beta_sigmas: bool = _key(False, "only", False)
    sigma_min: float | None = _key(None, "positive", True)  # used only with Karras sigmas
    sigma_max: float | None = _key(None, "positive", True)


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig(SchedulerConfig):
    timestep_spacing: str = _key("linspace", "choice", _SPACINGS)
    solver_order: int = _key(2, "only", 2)
    algorithm_type: str = _key("dpmsolver++", "only", "dpmsolver++")
    solver_type: str = _key("midpoint", "choice", ("midpoint", "heun"))
    lower_order_final: bool = _key(True, "bool")
    euler_at_final: bool = _key(False, "bool")
    final_sigmas_type: str = _key("zero", "choice", ("zero", "sigma_min"))
    lambda_min_clipped: float = _key(-math.inf, "lambda")
    variance_type: str | None = _key(None, "only", None)
    thresholding: bool = _key(False, "only", False)
    use_karras_sigmas: bool = _key(False, "bool", True)
    use_exponential_sigmas: bool = _key(False, "only", False)
    use_beta_sigmas: bool = _key(False, "only", False)
    use_lu_lambdas: bool = _key(False, "only", False)
    use_flow_sigmas: bool = _key(False, "only", False)
    use_dynamic_shifting: bool = _key(False, "only", False)
