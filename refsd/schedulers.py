"""Samplers: DDIM (eta = 0), Euler (discrete) and DPM-Solver++ (2M), in pure NumPy.

Each scheduler is configured from the dict in a diffusers folder's
``scheduler/scheduler_config.json`` (checked as ``refsd.schedulers_config``
says) and reproduces the float32 arithmetic of its
diffusers counterpart (``DDIMScheduler``, ``EulerDiscreteScheduler``,
``DPMSolverMultistepScheduler``) operation by operation, so that a reference run and
a diffusers run fed the same model outputs agree to float32 rounding::

    sched = make_scheduler("dpm++2m", config)     # or make_scheduler(None, config): config's _class_name
    sched.set_timesteps(20)                       # -> sched.timesteps
    x = x * sched.init_noise_sigma
    for i in range(len(sched.timesteps)):
        x_in = sched.scale_model_input(x, i)      # i is the step index, not the timestep
        eps = unet(x_in, sched.timesteps[i])
        x = sched.step(eps, i, x)

Arrays may have any layout (the project keeps latents NHWC): every scheduler
operation is elementwise with scalar coefficients. Inputs are converted to float32
and results are float32.

Precision notes (what "reproduces diffusers" means here, measured in
``tests/test_schedulers.py``):

* ``torch.linspace(a, b, n, dtype=float32)`` (the betas) is ``a32 + step32 * i`` for
  ``i < n // 2`` and ``b32 - step32 * (n - 1 - i)`` above, with
  ``step32 = (b32 - a32) / (n - 1)`` in float32 and each value rounded once (torch's
  CPU kernel contracts to an FMA). :func:`torch_linspace_f32` reproduces it bit for bit.
* ``torch.cumprod`` on CPU accumulates float32 inputs in float64 and rounds each
  partial product; so does :class:`NoiseSchedule` (a float32 ``np.cumprod`` differs in
  about 90 % of the entries).
* Scalar coefficients are float32 and every operation rounds to float32, in
  diffusers' order (``sample - sqrt(1 - a) * eps`` then ``/ sqrt(a)``, never simplified).
  ``sqrt``, ``log`` and ``exp`` are *correctly rounded* here (``log``/``exp`` are taken in
  float64 and rounded once). torch's CPU versions are vendor approximations (measured on
  an AVX512 build: sqrt up to 0.75 ulp, differing from IEEE sqrt in ~15 % of inputs;
  log 0.82 ulp; exp 0.55 ulp) and depend on the machine, so they cannot be the
  reference. The consequence: a scalar coefficient may differ from diffusers' by one
  float32 ulp, each step agrees to ~1e-7 relative, and a 50-step free-running
  trajectory drifts by up to a few 1e-6 relative (the test measures both).
* Timestep grids are computed exactly as diffusers does (NumPy there too), with the
  same dtypes: int64 for DDIM and DPM-Solver++, float32 for Euler.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from refsd.models.config import config_from_dict
from refsd.schedulers_config import DDIMConfig, DPMSolverConfig, EulerConfig, SchedulerConfig, _is_int

__all__ = [
    "SCHEDULERS",
    "CLASS_NAMES",
    "NoiseSchedule",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "make_scheduler",
    "default_scheduler_name",
    "SchedulerConfig",
    "DDIMConfig",
    "EulerConfig",
    "DPMSolverConfig",
    "torch_linspace_f32",
]

_F32 = np.float32


def _f32(x) -> np.float32:
    return np.float32(x)


def _log32(x: np.float32) -> np.float32:
    """Correctly rounded float32 log (log(0) = -inf without a warning)."""
    with np.errstate(divide="ignore"):
        return _f32(np.log(np.float64(x)))


def _exp32(x: np.float32) -> np.float32:
    """Correctly rounded float32 exp."""
    with np.errstate(over="ignore"):
        return _f32(np.exp(np.float64(x)))


def _sqrt32(x: np.float32) -> np.float32:
    return np.sqrt(_f32(x))


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    ``step = (f32(end) - f32(start)) / (steps - 1)`` in float32; the first half counts up
    from ``start`` and the second half down from ``end``, each value rounded once
    (``fma``). The exact product ``step * i`` (<= 24 + 31 bits) plus the endpoint is
    formed in float64 and rounded to float32.
    """
    a, b = _f32(start), _f32(end)
    if steps == 1:
        return np.array([a], dtype=_F32)
    step = (b - a) / _f32(steps - 1)
    idx = np.arange(steps, dtype=np.int64)
    up = np.float64(a) + np.float64(step) * idx
    down = np.float64(b) - np.float64(step) * (steps - 1 - idx)
    return np.where(idx < steps // 2, up, down).astype(_F32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule (``squaredcos_cap_v2``), in float64 then float32, as diffusers."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=_F32)


def _sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of a sigma, by linear interpolation in log sigma (diffusers' code)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def _karras_sigmas(in_sigmas: np.ndarray, steps: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """Karras et al. (2022) rho = 7 schedule between ``in_sigmas[-1]`` and ``in_sigmas[0]`` (float64)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


class NoiseSchedule:
    """The shared beta / alpha schedule of the three schedulers (diffusers' ``__init__``).

    ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod`` are float32 arrays of
    length ``num_train_timesteps``, computed as diffusers computes them on CPU
    (see :func:`torch_linspace_f32`; the cumulative product accumulates in float64).
    """

    #: diffusers class this scheduler mirrors; short name used by :func:`make_scheduler`
    diffusers_class: str = ""
    name: str = ""
    #: the config dataclass of this scheduler
    CONFIG: type[SchedulerConfig] = SchedulerConfig

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides):
        cfg = dict(config or {})
        cfg.update(overrides)
        #: the frozen config (``CONFIG``): the given keys, checked, and the diffusers defaults
        self.config = config_from_dict(self.CONFIG, cfg, source="scheduler config")
        #: keys of the given config this scheduler does not use (other schedulers' keys,
        #: ``_class_name``, ``_diffusers_version``...): ignored, as diffusers ignores them
        self.ignored_config_keys = sorted(k for k in cfg if k not in {f.name for f in dataclasses.fields(self.CONFIG)})
        c = self.config

        n = c.num_train_timesteps
        if c.trained_betas is not None:
            betas = np.array(c.trained_betas, dtype=_F32)
        elif c.beta_schedule == "linear":
            betas = torch_linspace_f32(c.beta_start, c.beta_end, n)
        elif c.beta_schedule == "scaled_linear":
            betas = torch_linspace_f32(c.beta_start ** 0.5, c.beta_end ** 0.5, n) ** 2
        else:  # squaredcos_cap_v2
            betas = _betas_for_alpha_bar(n)
        self.betas = betas.astype(_F32)
        self.alphas = (_F32(1.0) - self.betas).astype(_F32)
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(_F32)

        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None

    # -- shared helpers ------------------------------------------------------------------
    def _check_steps(self, num_inference_steps) -> int:
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        n = self.config.num_train_timesteps
        if num_inference_steps > n:
            raise ValueError(f"num_inference_steps={num_inference_steps} exceeds num_train_timesteps={n}")
        return int(num_inference_steps)

    def _require_timesteps(self) -> None:
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(steps) first")

    def _check_index(self, i) -> int:
        self._require_timesteps()
        if not _is_int(i) or not 0 <= i < len(self.timesteps):
            raise IndexError(f"step index must be an integer in [0, {len(self.timesteps)}), got {i!r}")
        return int(i)

    def _timestep_grid(self, steps: int, dtype, *, end: int | None = None, drop_last: bool = False,
                       round_linspace: bool = True) -> np.ndarray:
        """diffusers' timesteps for ``steps`` steps by ``timestep_spacing``, descending,
        with its dtype (int64 for DDIM and DPM-Solver++, float32 for Euler) and
        formulas: ``end`` (default ``num_train_timesteps``) bounds them above
        (DPM-Solver++'s ``lambda_min_clipped``); ``drop_last``: linspace and leading
        take ``steps + 1`` points and drop the last (DPM-Solver++); ``round_linspace``:
        linspace values rounded (not by Euler, whose timesteps are fractional)."""
        c = self.config
        T = c.num_train_timesteps
        end = T if end is None else end
        n = steps + 1 if drop_last else steps
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, end - 1, n)
            ts = (ts.round() if round_linspace else ts)[::-1]
        elif c.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (end // n)).round()[::-1]
        else:  # trailing
            ts = np.arange(end, 0, -(T / steps)).round()
        if drop_last and c.timestep_spacing != "trailing":
            ts = ts[:-1]
        ts = ts.astype(dtype)
        if c.timestep_spacing == "leading":
            ts += c.steps_offset
        elif c.timestep_spacing == "trailing":
            ts -= 1
        return ts

    def _final_sigma(self):
        """The sigma after the last step (Euler, DPM-Solver++): 0, or under
        ``final_sigmas_type="sigma_min"`` the smallest training sigma ``sqrt((1 - a0) / a0)``."""
        if self.config.final_sigmas_type == "sigma_min":
            a0 = self.alphas_cumprod[0]
            return _sqrt32((_F32(1.0) - a0) / a0)
        return 0

    def _train_sigmas(self) -> np.ndarray:
        """``((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`` in float32 (Euler / DPM)."""
        ac = self.alphas_cumprod
        return np.sqrt((_F32(1.0) - ac) / ac).astype(_F32)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: multiply the initial latents by it."""
        return 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """The UNet's input at step ``i`` (identity except for Euler)."""
        self._check_index(i)
        return np.asarray(sample, dtype=_F32)

    def __repr__(self) -> str:
        steps = self.num_inference_steps
        return f"{type(self).__name__}(name={self.name!r}, steps={steps}, config={self.config!r})"


# --------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------


class DDIMScheduler(NoiseSchedule):
    """DDIM with eta = 0 (deterministic), after diffusers' ``DDIMScheduler``.

    At step ``i`` with ``t = timesteps[i]`` and ``t_prev = t - T // steps`` (diffusers'
    rule, for every spacing; ``t_prev < 0`` uses ``final_alpha_cumprod``)::

        x0  = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)              # epsilon
        x0  = sqrt(a_t) * x - sqrt(1 - a_t) * v; eps = sqrt(a_t) * v + sqrt(1 - a_t) * x
        x0  = clip(x0, -r, r)                                     # if clip_sample
        x'  = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps
    """

    diffusers_class = "DDIMScheduler"
    name = "ddim"
    CONFIG = DDIMConfig

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides):
        super().__init__(config, **overrides)
        self.final_alpha_cumprod = _F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        steps = self._check_steps(num_inference_steps)
        ts = self._timestep_grid(steps, np.int64)
        self.num_inference_steps = steps
        self.timesteps = ts
        return ts

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, *,
             rounding: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The latents after step ``i`` (eta = 0). ``rounding``: applied to
        every coefficient and every primitive's result, as a framework computing
        on fp16 tensors does (PyTorch rounds a float32 scalar to the tensor's
        fp16 before multiplying, and stores each op's output): pass
        ``refsd.numerics.round_f16`` to emulate diffusers' DDIM step in fp16."""
        i = self._check_index(i)
        r = rounding if rounding is not None else (lambda v: v)
        mo = np.asarray(model_output, dtype=_F32)
        x = np.asarray(sample, dtype=_F32)
        t = int(self.timesteps[i])
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = _F32(1.0) - a_t
        sa, sb = r(_sqrt32(a_t)), r(_sqrt32(b_t))

        pred = self.config.prediction_type
        if pred == "epsilon":
            x0 = r(r(x - r(sb * mo)) / sa)
            eps = mo
        elif pred == "sample":
            x0 = mo
            eps = r(r(x - r(sa * x0)) / sb)
        else:  # v_prediction
            x0 = r(r(sa * x) - r(sb * mo))
            eps = r(r(sa * mo) + r(sb * x))

        if self.config.clip_sample:
            c = _F32(self.config.clip_sample_range)
            x0 = np.clip(x0, -c, c)

        # eta = 0: std_dev_t = 0, so the direction coefficient is sqrt(1 - a_prev - 0**2).
        direction = r(r(_sqrt32(_F32(1.0) - a_prev)) * eps)
        return r(r(r(_sqrt32(a_prev)) * x0) + direction).astype(_F32, copy=False)


# --------------------------------------------------------------------------------------
# Euler (discrete)
# --------------------------------------------------------------------------------------


class EulerDiscreteScheduler(NoiseSchedule):
    """Euler's method on the probability-flow ODE in sigma, after diffusers' ``EulerDiscreteScheduler``
    (``s_churn = 0``, so deterministic).

    ``sigmas`` (float32, length steps + 1, last = 0) interpolate the training sigmas
    ``sqrt((1 - a) / a)`` linearly at the timesteps (``use_karras_sigmas``: Karras et al.'s
    rho = 7 schedule, timesteps then fractional, by log-sigma interpolation). At step ``i``::

        x_in = x / sqrt(s_i**2 + 1)                              # scale_model_input
        x0   = x - s_i * eps                                     # epsilon
        x0   = v * (-s_i / sqrt(s_i**2 + 1)) + x / (s_i**2 + 1)  # v_prediction
        x'   = x + ((x - x0) / s_i) * (s_{i+1} - s_i)
    """

    diffusers_class = "EulerDiscreteScheduler"
    name = "euler"
    CONFIG = EulerConfig

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides):
        super().__init__(config, **overrides)
        self.sigmas: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        steps = self._check_steps(num_inference_steps)
        ts = self._timestep_grid(steps, np.float32, round_linspace=False)
        train_sigmas = self._train_sigmas()
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.config.use_karras_sigmas:
            sigmas = _karras_sigmas(sigmas, steps, self.config.sigma_min, self.config.sigma_max)
            ts = np.array([_sigma_to_t(s, np.log(train_sigmas)) for s in sigmas])
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(_F32)
        self.timesteps = ts.astype(np.float32)
        self.num_inference_steps = steps
        return self.timesteps

    @property
    def init_noise_sigma(self) -> float:
        """``max(sigmas)`` for linspace / trailing spacing, ``sqrt(max**2 + 1)`` for leading."""
        self._require_timesteps()
        s = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(s)
        return float(_sqrt32(s * s + _F32(1.0)))

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        i = self._check_index(i)
        s = self.sigmas[i]
        return (np.asarray(sample, dtype=_F32) / _sqrt32(s * s + _F32(1.0))).astype(_F32, copy=False)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The latents after step ``i``."""
        i = self._check_index(i)
        mo = np.asarray(model_output, dtype=_F32)
        x = np.asarray(sample, dtype=_F32)
        sigma = self.sigmas[i]
        sigma_hat = sigma  # sigma * (gamma + 1) with gamma = 0 (no churn)
        pred = self.config.prediction_type
        if pred == "sample":
            x0 = mo
        elif pred == "epsilon":
            x0 = x - sigma_hat * mo
        else:  # v_prediction
            s2p1 = sigma * sigma + _F32(1.0)
            x0 = mo * (-sigma / _sqrt32(s2p1)) + (x / s2p1)
        derivative = (x - x0) / sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        return (x + derivative * dt).astype(_F32, copy=False)


# --------------------------------------------------------------------------------------
# DPM-Solver++ (2M)
# --------------------------------------------------------------------------------------


class DPMSolverMultistepScheduler(NoiseSchedule):
    """DPM-Solver++ (2M): second-order multistep solver on the data prediction, after
    diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``,
    ``solver_order=2``.

    With ``alpha = 1 / sqrt(s**2 + 1)``, ``sigma = s * alpha``, ``lambda = log alpha - log sigma``,
    ``h = lambda_{i+1} - lambda_i``; ``D_i`` the data prediction (``x0``) at step ``i``::

        first order (step 0, and the last step when lower-order-final applies):
            x' = (sigma_{i+1} / sigma_i) * x - alpha_{i+1} * (exp(-h) - 1) * D_i
        second order (midpoint), r0 = (lambda_i - lambda_{i-1}) / h, D1 = (D_i - D_{i-1}) / r0:
            x' = (sigma_{i+1} / sigma_i) * x - alpha_{i+1} (e^-h - 1) D_i - 0.5 alpha_{i+1} (e^-h - 1) D1
        heun:  ... + alpha_{i+1} ((e^-h - 1) / h + 1) D1

    ``use_karras_sigmas`` replaces the sigmas by Karras et al.'s rho = 7 schedule (timesteps
    mapped back by log-sigma interpolation and rounded), as diffusers does ("DPM++ 2M Karras").

    The solver keeps the previous data prediction: call :meth:`step` for i = 0, 1, ...
    in order after :meth:`set_timesteps` (which resets the history).
    """

    diffusers_class = "DPMSolverMultistepScheduler"
    name = "dpm++2m"
    CONFIG = DPMSolverConfig

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides):
        super().__init__(config, **overrides)
        ac = self.alphas_cumprod
        alpha_t = np.sqrt(ac)
        sigma_t = np.sqrt(_F32(1.0) - ac)
        with np.errstate(divide="ignore"):
            self.lambda_t = (np.log(alpha_t.astype(np.float64)).astype(_F32)
                             - np.log(sigma_t.astype(np.float64)).astype(_F32))
        self.sigmas: np.ndarray | None = None
        self._history: list[np.ndarray] = []
        self._next_index = 0

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        steps = self._check_steps(num_inference_steps)
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], _F32(self.config.lambda_min_clipped)))
        ts = self._timestep_grid(steps, np.int64, end=self.config.num_train_timesteps - clipped_idx, drop_last=True)
        train_sigmas = self._train_sigmas()
        if self.config.use_karras_sigmas:
            sigmas = _karras_sigmas(np.flip(train_sigmas).copy(), steps)
            ts = np.array([_sigma_to_t(s, np.log(train_sigmas)) for s in sigmas])
            if self.config.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(_F32)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(ts)
        self._history = []
        self._next_index = 0
        return self.timesteps

    @staticmethod
    def _alpha_sigma(s: np.float32) -> tuple[np.float32, np.float32]:
        alpha = _F32(1.0) / _sqrt32(s * s + _F32(1.0))
        return alpha, s * alpha

    def _lambda(self, k: int) -> tuple[np.float32, np.float32, np.float32]:
        alpha, sigma = self._alpha_sigma(self.sigmas[k])
        return alpha, sigma, _log32(alpha) - _log32(sigma)

    def _data_prediction(self, mo: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        pred = self.config.prediction_type
        if pred == "sample":
            return mo
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        if pred == "epsilon":
            return (x - sigma * mo) / alpha
        return alpha * x - sigma * mo  # v_prediction

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The latents after step ``i``; steps must come in order 0, 1, ... (multistep history)."""
        i = self._check_index(i)
        if i != self._next_index:
            raise ValueError(
                f"DPM-Solver++ is multistep: step indices must run 0, 1, 2, ... after set_timesteps; "
                f"expected {self._next_index}, got {i} (call set_timesteps again to restart)"
            )
        mo = np.asarray(model_output, dtype=_F32)
        x = np.asarray(sample, dtype=_F32)
        n = len(self.timesteps)
        cfg = self.config
        lower_order_final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        d0 = self._data_prediction(mo, i, x)
        self._history = (self._history + [d0])[-2:]

        alpha_t, sigma_t, lam_t = self._lambda(i + 1)
        _, sigma_s0, lam_s0 = self._lambda(i)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam_t - lam_s0
            em1 = _exp32(-h) - _F32(1.0)
            if i == 0 or lower_order_final:
                out = (sigma_t / sigma_s0) * x - (alpha_t * em1) * d0
            else:
                _, _, lam_s1 = self._lambda(i - 1)
                m0, m1 = self._history[-1], self._history[-2]
                r0 = (lam_s0 - lam_s1) / h
                d1 = (_F32(1.0) / r0) * (m0 - m1)
                if cfg.solver_type == "midpoint":
                    out = (sigma_t / sigma_s0) * x - (alpha_t * em1) * m0 - (_F32(0.5) * (alpha_t * em1)) * d1
                else:  # heun
                    out = (sigma_t / sigma_s0) * x - (alpha_t * em1) * m0 + (alpha_t * (em1 / h + _F32(1.0))) * d1
        self._next_index = i + 1
        return out.astype(_F32, copy=False)


# --------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------

SCHEDULERS: dict[str, type[NoiseSchedule]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}

#: diffusers ``_class_name`` -> our name, for the default scheduler of a model folder
CLASS_NAMES: dict[str, str] = {cls.diffusers_class: name for name, cls in SCHEDULERS.items()}


def _valid_names() -> str:
    return ", ".join(repr(n) for n in SCHEDULERS)


def default_scheduler_name(config: Mapping[str, Any]) -> str:
    """The scheduler a diffusers folder's config names (``_class_name``), as one of our names.

    Raises ValueError for a class we do not implement (e.g. SD 1.5's ``PNDMScheduler``),
    suggesting to pick one of ours explicitly.
    """
    cls = config.get("_class_name")
    if cls is not None and not isinstance(cls, str):
        raise ValueError(f"scheduler config _class_name must be a string, got {cls!r}")
    if cls is None:
        raise ValueError(
            f"scheduler config has no _class_name, so there is no default scheduler: choose one of {_valid_names()}"
        )
    if cls in CLASS_NAMES:
        return CLASS_NAMES[cls]
    raise ValueError(
        f"the model's default scheduler {cls!r} is not implemented; choose one of {_valid_names()} explicitly "
        f"(the beta schedule and other shared settings of the config are used), e.g. 'ddim'"
    )


def make_scheduler(name: str | None, config: Mapping[str, Any] | None = None) -> NoiseSchedule:
    """A scheduler by name (``'ddim'``, ``'euler'``, ``'dpm++2m'``) from a diffusers scheduler config dict.

    ``name=None`` uses the config's ``_class_name`` (see :func:`default_scheduler_name`).
    Keys not used by the chosen scheduler are ignored (listed in ``ignored_config_keys``),
    missing keys take the diffusers class's defaults, and a value this reference does not
    implement raises ValueError naming the key and value.
    """
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config must be a JSON object, got {type(config).__name__}")
    if name is None:
        name = default_scheduler_name(config)
    key = name.lower() if isinstance(name, str) else name
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: valid names are {_valid_names()}")
    return SCHEDULERS[key](config)
