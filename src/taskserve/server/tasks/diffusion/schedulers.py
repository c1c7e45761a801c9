"""Diffusion schedulers in numpy: DDIM, Euler (discrete) and DPM-Solver++ multistep.

Each is a small stateful object for ONE denoising run, written to give what diffusers'
torch schedulers of the same name give for the same ``scheduler_config.json``: the same
timesteps and, step by step, the same samples (float32 arithmetic, like torch's).

    s = make_scheduler(SchedulerKind.EULER, config); s.set_timesteps(steps)
    for t in s.timesteps: x = s.step(unet(s.scale_model_input(x, t), t), t, x)

Config keys follow diffusers'; keys another scheduler class uses are ignored (as
``from_config`` does) and options not implemented here raise ``ValueError``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

F32 = np.float32


class SchedulerKind(enum.Enum):
    DDIM = "ddim"
    EULER = "euler"
    DPM_SOLVER_PP = "dpm-solver++"


def _betas(cfg: Mapping[str, Any]) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=F32)
    schedule = cfg["beta_schedule"]
    if schedule == "linear":
        return np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float64).astype(F32)
    if schedule == "scaled_linear":
        root = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float64).astype(F32)
        return root**2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=F32)
    raise ValueError(f"beta_schedule {schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


class DiffusionScheduler:
    """The shared part: config merging, betas and the step counter."""

    kind: ClassVar[SchedulerKind]
    DEFAULTS: ClassVar[dict[str, Any]]
    # option -> the only value implemented here
    FIXED: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config: dict[str, Any] = {k: config.get(k, v) for k, v in self.DEFAULTS.items()}
        for key, value in self.FIXED.items():
            if self.config.get(key, value) != value:
                raise ValueError(
                    f"{self.kind.value} scheduler: {key}={self.config[key]!r} is not supported (only {value!r})"
                )
        if self.config.get("prediction_type") not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {self.config.get('prediction_type')!r} is not supported")
        self.alphas_cumprod = np.cumprod(F32(1.0) - _betas(self.config), dtype=F32)
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.num_inference_steps = 0
        self._step = 0
        self._begin = 0

    @property
    def init_noise_sigma(self) -> np.float32:
        return F32(1.0)

    def set_begin_index(self, index: int) -> None:
        """Start at ``timesteps[index]`` (image-to-image skips the noisiest steps)."""
        self._begin = self._step = index

    def _spaced(self, n: int, dtype: type[np.generic], offset_key: str = "steps_offset") -> np.ndarray:
        train = int(self.config["num_train_timesteps"])
        spacing = self.config["timestep_spacing"]
        out: np.ndarray
        if spacing == "linspace":
            out = np.linspace(0, train - 1, n).round()[::-1].astype(dtype)
        elif spacing == "leading":
            out = (np.arange(0, n) * (train // n)).round()[::-1].astype(dtype) + self.config[offset_key]
        elif spacing == "trailing":
            out = np.round(np.arange(train, 0, -train / n)).astype(dtype) - 1
        else:
            raise ValueError(f"timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")
        return out

    def set_timesteps(self, n: int) -> None:
        """Choose ``n`` timesteps (``self.timesteps``) and restart at the first."""
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        raise NotImplementedError


class DDIM(DiffusionScheduler):
    """diffusers.DDIMScheduler with eta 0 (deterministic)."""

    kind = SchedulerKind.DDIM
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", "thresholding": False, "clip_sample_range": 1.0,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    }  # fmt: skip
    FIXED: ClassVar[dict[str, Any]] = {"thresholding": False, "rescale_betas_zero_snr": False}

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(self, n: int) -> None:
        self.num_inference_steps = n
        self.timesteps = self._spaced(n, np.int64)
        self._step = self._begin = 0

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        t = int(timestep)
        prev = t - int(self.config["num_train_timesteps"]) // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b_t = F32(1) - a_t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.config["clip_sample"]:
            limit = F32(self.config["clip_sample_range"])
            x0 = np.clip(x0, -limit, limit)
        direction = (F32(1) - a_prev) ** 0.5 * eps
        self._step += 1
        out: np.ndarray = (a_prev**0.5 * x0 + direction).astype(F32)
        return out

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        a = self.alphas_cumprod[int(timestep)]
        out: np.ndarray = (a**0.5 * original + (F32(1) - a) ** 0.5 * noise).astype(F32)
        return out


class _SigmaScheduler(DiffusionScheduler):
    """Schedulers that index a sigma table by their step counter."""

    sigmas: np.ndarray

    def _train_sigmas(self) -> np.ndarray:
        a = self.alphas_cumprod
        out: np.ndarray = ((F32(1) - a) / a) ** 0.5
        return out

    def _final_sigma(self) -> float:
        kind = self.config["final_sigmas_type"]
        if kind == "zero":
            return 0.0
        if kind == "sigma_min":
            return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        raise ValueError(f"final_sigmas_type {kind!r} is not supported (zero, sigma_min)")


class EulerDiscrete(_SigmaScheduler):
    """diffusers.EulerDiscreteScheduler without churn (s_churn 0: deterministic)."""

    kind = SchedulerKind.EULER
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    }  # fmt: skip
    FIXED: ClassVar[dict[str, Any]] = {
        "interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "timestep_type": "discrete", "rescale_betas_zero_snr": False,
    }  # fmt: skip

    def set_timesteps(self, n: int) -> None:
        self.num_inference_steps = n
        if self.config["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, self.config["num_train_timesteps"] - 1, n, dtype=F32)[::-1].copy()
        else:
            timesteps = self._spaced(n, F32)
        sigmas = np.interp(timesteps, np.arange(0, len(self.alphas_cumprod)), self._train_sigmas())
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        self.timesteps = timesteps.astype(F32)
        self._step = self._begin = 0

    @property
    def init_noise_sigma(self) -> np.float32:
        top = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return F32(top)
        return F32((top**2 + 1) ** 0.5)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        sigma = self.sigmas[self._step]
        out: np.ndarray = (sample / ((sigma**2 + 1) ** 0.5)).astype(F32)
        return out

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        sigma = self.sigmas[self._step]
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        derivative = (sample - x0) / sigma
        dt = self.sigmas[self._step + 1] - sigma
        self._step += 1
        out: np.ndarray = (sample + derivative * dt).astype(F32)
        return out

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        out: np.ndarray = (original + noise * self.sigmas[self._step]).astype(F32)
        return out


class DPMSolverPlusPlus(_SigmaScheduler):
    """diffusers.DPMSolverMultistepScheduler with algorithm_type dpmsolver++ (orders 1 and 2)."""

    kind = SchedulerKind.DPM_SOLVER_PP
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
        "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
        "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
    }  # fmt: skip
    FIXED: ClassVar[dict[str, Any]] = {
        "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
        "variance_type": None, "rescale_betas_zero_snr": False,
    }  # fmt: skip

    def __init__(self, config: Mapping[str, Any]) -> None:
        # Pipelines saved with DPM-Solver carry algorithm_type; other schedulers' configs don't.
        super().__init__(config)
        if self.config["algorithm_type"] not in ("dpmsolver++", "deis"):
            raise ValueError(f"algorithm_type {self.config['algorithm_type']!r} is not supported (dpmsolver++)")
        if self.config["solver_order"] not in (1, 2):
            raise ValueError(f"solver_order {self.config['solver_order']} is not supported (1 or 2)")
        if self.config["solver_type"] not in ("midpoint", "heun", "logrho", "bh1", "bh2"):
            raise ValueError(f"solver_type {self.config['solver_type']!r} is not supported")
        a = self.alphas_cumprod
        self._lambda_t = np.log(np.sqrt(a)) - np.log(np.sqrt(F32(1) - a))
        self._outputs: list[np.ndarray | None] = []
        self._lower_order_nums = 0

    def set_timesteps(self, n: int) -> None:
        train = int(self.config["num_train_timesteps"])
        clipped = int(np.searchsorted(self._lambda_t[::-1], self.config["lambda_min_clipped"]))
        last = train - clipped
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += self.config["steps_offset"]
        elif spacing == "trailing":
            timesteps = np.arange(last, 0, -train / n).round().copy().astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing {spacing!r} is not supported (linspace, leading, trailing)")
        sigmas = np.interp(timesteps, np.arange(0, len(self.alphas_cumprod)), self._train_sigmas())
        self.sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(F32)
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self._outputs = [None] * int(self.config["solver_order"])
        self._lower_order_nums = 0
        self._step = self._begin = 0

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = F32(1) / ((sigma**2 + F32(1)) ** 0.5)
        return alpha, sigma * alpha

    @staticmethod
    def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
        with np.errstate(divide="ignore"):
            return F32(np.log(alpha) - np.log(sigma))

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        i, n = self._step, len(self.timesteps)
        cfg = self.config
        lower_final = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        lower_second = i == n - 2 and cfg["lower_order_final"] and n < 15
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        kind = cfg["prediction_type"]
        if kind == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        elif kind == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        x0 = x0.astype(F32)
        self._outputs = [*self._outputs[1:], x0]
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        h = self._lambda(alpha_t, sigma_t) - self._lambda(alpha_s0, sigma_s0)
        with np.errstate(over="ignore", invalid="ignore"):
            exp_neg_h = F32(np.exp(-h))
        if cfg["solver_order"] == 1 or self._lower_order_nums < 1 or lower_final:
            out = (sigma_t / sigma_s0) * sample - (alpha_t * (exp_neg_h - F32(1.0))) * x0
        else:
            del lower_second  # order 2 is the highest implemented, so "second" changes nothing
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            h0 = self._lambda(alpha_s0, sigma_s0) - self._lambda(alpha_s1, sigma_s1)
            m0, m1 = self._outputs[-1], self._outputs[-2]
            assert m0 is not None and m1 is not None
            r0 = h0 / h
            d0, d1 = m0, (F32(1.0) / r0) * (m0 - m1)
            if cfg["solver_type"] == "heun":
                out = (
                    (sigma_t / sigma_s0) * sample
                    - (alpha_t * (exp_neg_h - F32(1.0))) * d0
                    + (alpha_t * ((exp_neg_h - F32(1.0)) / h + F32(1.0))) * d1
                )
            else:  # midpoint (logrho/bh1/bh2 map to it in diffusers)
                out = (
                    (sigma_t / sigma_s0) * sample
                    - (alpha_t * (exp_neg_h - F32(1.0))) * d0
                    - F32(0.5) * (alpha_t * (exp_neg_h - F32(1.0))) * d1
                )
        if self._lower_order_nums < cfg["solver_order"]:
            self._lower_order_nums += 1
        self._step += 1
        result: np.ndarray = np.asarray(out, dtype=F32)
        return result

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(self.sigmas[self._step])
        out: np.ndarray = (alpha * original + sigma * noise).astype(F32)
        return out


SCHEDULERS: dict[SchedulerKind, type[DiffusionScheduler]] = {
    SchedulerKind.DDIM: DDIM,
    SchedulerKind.EULER: EulerDiscrete,
    SchedulerKind.DPM_SOLVER_PP: DPMSolverPlusPlus,
}


def make_scheduler(kind: SchedulerKind, config: Mapping[str, Any]) -> DiffusionScheduler:
    """A fresh scheduler for one run; ``ValueError`` for options not implemented here."""
    return SCHEDULERS[kind](config)
