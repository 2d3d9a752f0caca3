"""Foreign model conventions -> one ``EpsFn`` in canonical time (docs/design.md §1).

Canonical time: ``x_t = a x + s z`` with ``a = sqrt(1 - t)``, ``s = sqrt(t)``. Every model the library consumes
is seen as ``eps(x_t, t) = E[z | x_t]``. This module is the one place where other conventions are converted:

* **Prediction kinds** in canonical time (:func:`eps_from`, :func:`pred_from_eps`, :func:`convert`):

  ============  ================================  ====================================
  kind          prediction                        eps from the prediction
  ============  ================================  ====================================
  ``eps``       ``E[z | x_t]``                    ``eps``
  ``x0``        ``E[x | x_t]`` (denoiser)         ``(x_t - a x0) / s``
  ``v``         ``a eps - s x0`` (Salimans-Ho)    ``s x_t + a v``
  ``score``     ``grad log p_t(x_t)``             ``-s score``
  ``velocity``  ``E[z - x | x_t]`` (flow match)   ``(x_t + a velocity) / (a + s)``
  ============  ================================  ====================================

* **Continuous clocks** (:class:`ClockEps` and its constructors): a model ``fn(x_s, s)`` that lives on another
  clock ``s`` and on a rescaled input ``x_s = c(t) x_t``:

  - VP-SDE (score_sde, sdeflow-light; :func:`from_vp_sde`): ``t = 1 - exp(-∫_0^s beta)``, ``c = 1``;
  - variance exploding ``x + sigma z`` (:func:`from_ve`, k-diffusion's ``model(x, sigma) -> denoised``:
    :func:`from_k_diffusion`): ``sigma = sqrt(t / (1 - t))``, ``x_VE = x_t sqrt(1 + sigma^2)``;
  - flow matching / rectified flow ``x_s = (1 - s) x + s z`` with velocity ``z - x`` (:func:`from_flow`):
    ``s = sqrt(t) / (sqrt(t) + sqrt(1 - t))``, ``x_s = x_t / (sqrt(t) + sqrt(1 - t))``, so
    ``t = s^2 / ((1 - s)^2 + s^2)``.

  A foreign prediction converts to canonical by: ``eps``, ``x0`` and ``velocity`` are unchanged (they do not
  depend on the input's scale), the score scales as ``score_t = c score_s`` and ``v_t = v_s / c``.

* **Discrete DDPM models** (:class:`DiffusersEps`): a diffusers ``UNet2DModel``, or any module called as
  ``model(x, timestep)`` returning a tensor or an object with ``.sample``, together with its scheduler config.
  Timestep ``j`` (0-based) sits at ``t_j = 1 - alphas_cumprod[j]``.

Trained range. A network is trained on a range of times; evaluating it outside would extrapolate it. Every
adapter takes the trained range and ``out_of_range``: ``"raise"`` (default: a ``ValueError`` naming the range
and the offending times) or ``"clamp"`` (evaluate the network at the nearest end of the range as if ``x_t`` had
been drawn there: bounded, never extrapolated, and documented as an approximation). Times within 1e-6 in
log-SNR of an end are clamped silently, to absorb rounding.

This module does not import diffusers: :class:`DiffusersEps` reads the scheduler's config (a dict or any object
with ``.config``) and recomputes the training grid in float64. Loading and saving folders is in
:mod:`scoredensity.diffusers_io`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .ddpm import reverse_variances  # the one definition of the DDPM reverse / posterior variances
from .epsfn import DEFAULT_LAM_RANGE
from .schedules import DDPMSchedule, VPLinearClock, alpha_sigma_from_logsnr, logsnr_from_t

__all__ = [
    "PREDICTION_KINDS",
    "eps_from",
    "pred_from_eps",
    "convert",
    "ClockEps",
    "from_canonical",
    "from_vp_sde",
    "from_ve",
    "from_k_diffusion",
    "from_flow",
    "DiffusersEps",
    "betas_from_scheduler_config",
    "scheduler_config_dict",
]

PREDICTION_KINDS = ("eps", "x0", "v", "score", "velocity")
"""Prediction kinds understood by :func:`eps_from` / :func:`pred_from_eps` (canonical time)."""

OutOfRange = Literal["raise", "clamp"]
_LAM_TOL = 1e-6  # log-SNR slack at the ends of a trained range (rounding, not extrapolation)


# ---------------------------------------------------------------------------------------------- prediction kinds
def _coeffs(t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, s) = (sqrt(1-t), sqrt(t))`` in float64 from the log-SNR, shaped [B, 1, ...] to broadcast on ``like``."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be [B] = ({like.shape[0]},), got shape {tuple(t.shape)}")
    a, s = alpha_sigma_from_logsnr(logsnr_from_t(t))
    shape = (-1,) + (1,) * (like.dim() - 1)
    return a.reshape(shape), s.reshape(shape)


def _check_kind(kind: str) -> None:
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTION_KINDS}")


def eps_from(kind: str, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Noise prediction ``eps`` [B, *shape] from a prediction of another kind, all in canonical time.

    Args:
        kind: one of :data:`PREDICTION_KINDS` (table in the module docstring).
        pred: [B, *shape] the prediction.
        x_t: [B, *shape] the noisy input ``sqrt(1-t) x + sqrt(t) z``.
        t: [B] canonical time (float64). ``x0`` needs ``t > 0``; every other kind is defined on [0, 1].

    Returns:
        eps in the promoted dtype of ``pred`` and ``x_t`` (float64 coefficients are cast to it).
    """
    _check_kind(kind)
    if pred.shape != x_t.shape:
        raise ValueError(f"prediction of shape {tuple(pred.shape)} does not match x_t of shape {tuple(x_t.shape)}")
    dtype = torch.promote_types(pred.dtype, x_t.dtype)
    a, s = (c.to(dtype) for c in _coeffs(t, x_t))
    pred, x_t = pred.to(dtype), x_t.to(dtype)
    if kind == "eps":
        return pred
    if kind == "x0":
        return (x_t - a * pred) / s
    if kind == "v":
        return s * x_t + a * pred
    if kind == "score":
        return -s * pred
    return (x_t + a * pred) / (a + s)  # velocity


def pred_from_eps(kind: str, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Prediction of ``kind`` [B, *shape] from a noise prediction, in canonical time (inverse of :func:`eps_from`).

    ``x0``, ``v`` and ``velocity`` need ``t < 1``; ``score`` needs ``t > 0``.
    """
    _check_kind(kind)
    if eps.shape != x_t.shape:
        raise ValueError(f"eps of shape {tuple(eps.shape)} does not match x_t of shape {tuple(x_t.shape)}")
    dtype = torch.promote_types(eps.dtype, x_t.dtype)
    a, s = (c.to(dtype) for c in _coeffs(t, x_t))
    eps, x_t = eps.to(dtype), x_t.to(dtype)
    if kind == "eps":
        return eps
    if kind == "x0":
        return (x_t - s * eps) / a
    if kind == "v":
        return (eps - s * x_t) / a
    if kind == "score":
        return -eps / s
    return ((a + s) * eps - x_t) / a  # velocity


def convert(from_kind: str, to_kind: str, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Convert a prediction between any two kinds of :data:`PREDICTION_KINDS` (through eps), canonical time."""
    return pred_from_eps(to_kind, eps_from(from_kind, pred, x_t, t), x_t, t)


# ---------------------------------------------------------------------------------------------- trained range
def _check_mode(mode: str, allowed: tuple[str, ...] = ("raise", "clamp")) -> None:
    if mode not in allowed:
        raise ValueError(f"out_of_range must be one of {allowed}, got {mode!r}")


def _limit_t(t: Tensor, t_min: float, t_max: float, mode: str, what: str) -> Tensor:
    """Keep ``t`` [B] inside the trained range ``[t_min, t_max]`` (canonical time).

    Times within ``_LAM_TOL`` in log-SNR of an end are clamped silently; beyond that ``mode`` decides:
    ``"raise"`` raises a ``ValueError`` naming the range, ``"clamp"`` clamps.
    """
    lam = logsnr_from_t(t)
    lam_hi = logsnr_from_t(torch.tensor(t_min, dtype=torch.float64))  # small t = high log-SNR
    lam_lo = logsnr_from_t(torch.tensor(t_max, dtype=torch.float64))
    outside = (lam > lam_hi + _LAM_TOL) | (lam < lam_lo - _LAM_TOL) | t.isnan()
    if mode == "raise" and outside.any():
        rows = outside.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{what} was trained on canonical t in [{t_min:.6g}, {t_max:.6g}] (log-SNR [{float(lam_lo):.4g}, "
            f"{float(lam_hi):.4g}]); got t = {[float(t[i]) for i in rows]} (rows {rows}). Restrict the "
            f"estimator's range to the trained one, or pass out_of_range='clamp' to evaluate the network at the "
            f"nearest trained time instead of extrapolating it"
        )
    return t.clamp(t_min, t_max)


def _as_t(t: Tensor, x_t: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x_t.device)
    if t.dim() == 0:
        t = t.expand(x_t.shape[0])
    if t.shape != (x_t.shape[0],):
        raise ValueError(f"t must be [B] = ({x_t.shape[0]},), got shape {tuple(t.shape)}")
    return t.to(torch.float64)


# ---------------------------------------------------------------------------------------------- continuous clocks
class ClockEps(nn.Module):
    """A model on a foreign continuous clock seen as a canonical ``EpsFn``.

    ``eps_fn(x_t, t)`` evaluates ``fn(c(t) x_t, s(t))`` and converts its output from ``kind`` to eps
    (module docstring: ``score`` is multiplied by ``c``, ``v`` divided by ``c``, the other kinds unchanged).

    Args:
        fn: the foreign model ``fn(x_s [B, *shape], s [B]) -> prediction [B, *shape]``; ``s`` is passed as float64
            in ``fn``'s clock (cast inside ``fn`` if the network wants another dtype).
        to_clock: canonical ``t`` [B] float64 -> ``(s, c)``: the foreign time [B] and the input scale [B].
        kind: what ``fn`` predicts, one of :data:`PREDICTION_KINDS`, in the foreign coordinates.
        t_range: trained range in canonical time ``(t_min, t_max)``, or ``None`` for no check.
        out_of_range: ``"raise"`` or ``"clamp"`` (module docstring).
        name: how error messages call the model.
    """

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor], Tensor],
        to_clock: Callable[[Tensor], tuple[Tensor, Tensor]],
        kind: str,
        *,
        t_range: tuple[float, float] | None = None,
        out_of_range: OutOfRange = "raise",
        name: str = "model",
    ):
        super().__init__()
        _check_kind(kind)
        _check_mode(out_of_range)
        if t_range is not None and not (0 <= t_range[0] <= t_range[1] <= 1):
            raise ValueError(f"t_range must satisfy 0 <= t_min <= t_max <= 1, got {t_range}")
        self.fn = fn  # an nn.Module is registered, so .to(device) and .parameters() reach it
        self.to_clock = to_clock
        self.kind = kind
        self.t_range = t_range
        self.out_of_range = out_of_range
        self.name = name

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``eps(x_t [B, *shape], t [B] float64) -> [B, *shape]`` in ``x_t``'s dtype."""
        t = _as_t(t, x_t)
        if self.t_range is not None:
            t = _limit_t(t, self.t_range[0], self.t_range[1], self.out_of_range, self.name)
        s, c = self.to_clock(t)
        c_b = c.reshape((-1,) + (1,) * (x_t.dim() - 1))
        pred = self.fn((c_b * x_t.to(torch.float64)).to(x_t.dtype), s)
        if not isinstance(pred, Tensor) or pred.shape != x_t.shape:
            got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            raise ValueError(f"{self.name} returned {got} for input of shape {tuple(x_t.shape)}")
        if self.kind == "score":
            pred = pred * c_b.to(pred.dtype)
        elif self.kind == "v":
            pred = pred / c_b.to(pred.dtype)
        return eps_from(self.kind, pred, x_t, t).to(x_t.dtype)


def _identity_clock(t: Tensor) -> tuple[Tensor, Tensor]:
    return t, torch.ones_like(t)


def from_canonical(
    fn: Callable[[Tensor, Tensor], Tensor],
    kind: str,
    *,
    t_range: tuple[float, float] | None = None,
    out_of_range: OutOfRange = "raise",
) -> ClockEps:
    """A canonical-time model predicting ``kind`` (``x0``, ``v``, ``score``, ``velocity``) as an ``EpsFn``."""
    return ClockEps(fn, _identity_clock, kind, t_range=t_range, out_of_range=out_of_range, name=f"{kind} model")


def from_vp_sde(
    fn: Callable[[Tensor, Tensor], Tensor],
    kind: str = "score",
    *,
    clock: Any = None,
    s_range: tuple[float, float] | None = (0.0, 1.0),
    out_of_range: OutOfRange = "raise",
) -> ClockEps:
    """A VP-SDE model (score_sde / sdeflow-light convention) as an ``EpsFn``.

    The VP-SDE with ``beta(s)`` linear on ``s in [0, 1]`` is the canonical process after the change of clock
    ``t = 1 - exp(-∫_0^s beta)`` (``clock.to_t``); the input is the same (``c = 1``), so for a score model
    ``eps = -sqrt(t) score(x_t, s(t))``.

    Args:
        fn: ``fn(x [B, *shape], s [B] float64) -> prediction``, ``s`` the VP time.
        kind: ``"score"`` (default), or ``"eps"``, ``"x0"``, ``"v"`` of the same process.
        clock: any object with ``to_t(s)`` / ``from_t(t)``; default :class:`~scoredensity.schedules.VPLinearClock`
            (``beta`` 0.1..20).
        s_range: the VP times the model was trained on (score_sde: ``(1e-5, 1)``); ``None``: no check.
            The default ``(0, 1)`` refuses ``t > t(1) = 1 - exp(-10.05)`` (log-SNR < -10.05).
        out_of_range: ``"raise"`` or ``"clamp"``.
    """
    clock = VPLinearClock() if clock is None else clock

    def to_clock(t: Tensor) -> tuple[Tensor, Tensor]:
        return clock.from_t(t), torch.ones_like(t)

    t_range = None if s_range is None else _t_range_of(clock.to_t, s_range)
    return ClockEps(fn, to_clock, kind, t_range=t_range, out_of_range=out_of_range, name=f"VP-SDE {kind} model")


def _t_range_of(to_t: Callable[[Tensor], Tensor], rng: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(to_t(torch.tensor(float(v), dtype=torch.float64))) for v in rng)
    if not lo <= hi:
        raise ValueError(f"range {rng} is not increasing")
    return lo, hi


def _ve_clock(t: Tensor) -> tuple[Tensor, Tensor]:
    lam = logsnr_from_t(t)
    # sigma = sqrt(t / (1 - t)) and c = sqrt(1 + sigma^2) = 1 / sqrt(1 - t), both from the log-SNR
    return torch.exp(-0.5 * lam), torch.rsqrt(torch.sigmoid(lam))


def from_ve(
    fn: Callable[[Tensor, Tensor], Tensor],
    kind: str = "score",
    *,
    sigma_range: tuple[float, float] | None = None,
    out_of_range: OutOfRange = "raise",
) -> ClockEps:
    """A variance-exploding model (``x + sigma z``) as an ``EpsFn``.

    ``sigma = sqrt(t / (1 - t))`` and ``x_VE = x_t sqrt(1 + sigma^2)``. For a VE score ``eps = -sigma score``;
    for a denoiser (``kind="x0"``) ``eps = (x_VE - D) / sigma``.

    Args:
        fn: ``fn(x_VE [B, *shape], sigma [B] float64) -> prediction``.
        kind: ``"score"`` (default), ``"x0"`` (a denoiser), ``"eps"``.
        sigma_range: the trained ``(sigma_min, sigma_max)`` (e.g. EDM's ``(0.002, 80)``); ``None``: no check.
        out_of_range: ``"raise"`` or ``"clamp"``.
    """
    if kind == "v":
        raise ValueError("a VE model has no v-prediction (v needs a + s scales with a^2 + s^2 = 1)")
    t_range = None
    if sigma_range is not None:
        t_range = _t_range_of(lambda sg: sg**2 / (1 + sg**2), sigma_range)
    return ClockEps(fn, _ve_clock, kind, t_range=t_range, out_of_range=out_of_range, name=f"VE {kind} model")


def from_k_diffusion(
    model: Callable[[Tensor, Tensor], Tensor],
    *,
    sigma_range: tuple[float, float] | None = None,
    out_of_range: OutOfRange = "raise",
) -> ClockEps:
    """k-diffusion's convention ``model(x, sigma) -> denoised`` (VE input ``x + sigma z``) as an ``EpsFn``.

    ``sigma_range`` defaults to the model's ``(sigma_min, sigma_max)`` attributes when it has them (k-diffusion's
    wrappers do), else no range check.
    """
    if sigma_range is None and hasattr(model, "sigma_min") and hasattr(model, "sigma_max"):
        sigma_range = (float(model.sigma_min), float(model.sigma_max))
    return from_ve(model, "x0", sigma_range=sigma_range, out_of_range=out_of_range)


def _flow_clock(t: Tensor) -> tuple[Tensor, Tensor]:
    a, s = alpha_sigma_from_logsnr(logsnr_from_t(t))
    return s / (a + s), 1 / (a + s)


def from_flow(
    fn: Callable[[Tensor, Tensor], Tensor],
    kind: str = "velocity",
    *,
    s_range: tuple[float, float] | None = (0.0, 1.0),
    out_of_range: OutOfRange = "raise",
) -> ClockEps:
    """A flow-matching / rectified-flow model as an ``EpsFn``.

    Convention: ``x_s = (1 - s) x + s z`` (``s = 0`` data, ``s = 1`` noise) and velocity ``v = z - x``. With
    ``a_s = 1 - s``, ``b_s = s`` the canonical point is ``x_t = x_s / sqrt(a_s^2 + b_s^2)`` at
    ``t = s^2 / ((1 - s)^2 + s^2)``; conversely ``s = sqrt(t) / (sqrt(t) + sqrt(1 - t))`` and
    ``x_s = x_t / (sqrt(t) + sqrt(1 - t))``, and ``eps = x_s + (1 - s) v``. For the opposite convention
    (``s = 1`` data, velocity ``x - z``) pass ``lambda x, s: -model(x, 1 - s)``.

    Args:
        fn: ``fn(x_s [B, *shape], s [B] float64) -> prediction``.
        kind: ``"velocity"`` (default), or ``"eps"``, ``"x0"``, ``"score"`` (score of ``x_s``'s density).
        s_range: trained flow times, default ``(0, 1)`` (everything); ``None``: no check.
        out_of_range: ``"raise"`` or ``"clamp"``.
    """
    if kind == "v":
        raise ValueError("use kind='velocity' for a flow model (v-prediction is the VP parameterisation)")
    t_range = None
    if s_range is not None:
        t_range = _t_range_of(lambda s: s**2 / ((1 - s) ** 2 + s**2), s_range)
    return ClockEps(fn, _flow_clock, kind, t_range=t_range, out_of_range=out_of_range, name=f"flow {kind} model")


# ---------------------------------------------------------------------------------------------- diffusers schedules
def scheduler_config_dict(scheduler: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The config of a diffusers scheduler as a plain dict: accepts a dict, a scheduler object (``.config``)
    or a ``FrozenDict``."""
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    config = getattr(scheduler, "config", None)
    if isinstance(config, Mapping):
        out = dict(config)
        out.setdefault("_class_name", type(scheduler).__name__)
        return out
    raise TypeError(f"expected a scheduler config dict or a diffusers scheduler, got {type(scheduler).__name__}")


_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")


def _betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> Tensor:
    """``b_i = min(1 - abar(i/T + 1/T) / abar(i/T), max_beta)`` (Nichol & Dhariwal's discretisation), float64."""
    out = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(out, dtype=torch.float64)


def _rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024 (Algorithm 1): shift and scale ``sqrt(abar)`` so the last step has zero SNR, in float64."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def betas_from_scheduler_config(config: Mapping[str, Any]) -> Tensor:
    """The training betas [T] (float64) of a diffusers DDPM/DDIM-style scheduler config, recomputed in float64.

    Reproduces diffusers' ``beta_schedule`` options (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``,
    ``sigmoid``, ``laplace``), ``trained_betas`` and ``rescale_betas_zero_snr`` (then the last step has
    ``abar = 0``, canonical ``t_T = 1``). diffusers itself computes them in float32; the two agree to float32
    precision.

    Raises:
        ValueError: for an unknown ``beta_schedule`` or a scheduler of another family (flow matching, VE).
    """
    cls = str(config.get("_class_name", ""))
    if cls.startswith("FlowMatch") or "Ve" in cls or "VE" in cls:
        raise ValueError(
            f"scheduler {cls} is not a discrete variance-preserving (DDPM) schedule; wrap such a model with "
            f"from_flow / from_ve instead"
        )
    num_steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64).flatten()
    elif schedule == "linear":
        betas = torch.linspace(start, end, num_steps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(math.sqrt(start), math.sqrt(end), num_steps, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(num_steps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (end - start) + start
    elif schedule == "laplace":

        def laplace(u: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - u) * math.log(1 - 2 * abs(0.5 - u) + 1e-6)
            return math.sqrt(math.exp(lmb) / (1 + math.exp(lmb)))

        betas = _betas_for_alpha_bar(num_steps, laplace)
    else:
        raise ValueError(f"unknown beta_schedule {schedule!r}; known: {_BETA_SCHEDULES} or trained_betas")
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


# ---------------------------------------------------------------------------------------------- diffusers models
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_TIMESTEP_MODES = ("interpolated", "nearest")
_SNAP = 1e-9  # fractional timesteps this close to an integer are fed as that integer


class DiffusersEps(nn.Module):
    """A discrete-time DDPM model (diffusers convention) seen as a canonical ``EpsFn``.

    Timestep ``j`` (0-based) sits at canonical ``t_j = 1 - alphas_cumprod[j]``; the model's input is ``x_t``
    itself (a VP model: no rescaling; images in the model's data scale, [-1, 1] for diffusers pipelines).
    A continuous ``t`` maps to a timestep by ``timesteps``:

    * ``"interpolated"`` (default): the fractional timestep whose log-SNR interpolates linearly between the
      neighbouring grid points (:meth:`~scoredensity.schedules.DDPMSchedule.step_of_t`), fed to the network as a
      float (``UNet2DModel``'s sinusoidal embedding accepts it); the output is read at ``t`` itself. Exact at
      the grid points. With a zero-terminal-SNR schedule (``t_T = 1``, log-SNR ``-inf``) the last interval
      interpolates linearly in ``sqrt(1 - t)`` instead (Lin et al.'s rescaling is affine in ``sqrt(abar)``).
    * ``"nearest"``: the grid timestep nearest in log-SNR, fed as an integer; the output is read at that grid
      time ``t_j`` (the time the network was told), not at ``t``. Networks with a learned (table) time embedding
      take integer timesteps only and need this mode.

    Measured with an exact Gaussian mixture as the network (d = 32, t log-SNR-uniform on the trained range): on
    diffusers' default 1000-step linear grid "nearest" errs by 1.6e-3 RMS per element of eps (interpolated:
    2e-15) and shifts the formula's log-density by -2.4e-4 nats/dim; on a 100-step grid by 1.4e-2 and
    -6.6e-3 nats/dim.

    Prediction types ``epsilon``, ``v_prediction`` (``v = sqrt(abar) eps - sqrt(1-abar) x0``) and ``sample``
    (``x0``). Variance types ``learned`` / ``learned_range``: the model outputs ``2C`` channels; the first ``C``
    are the mean part (eps, v or x0) and are what this ``EpsFn`` returns; the variance is available at grid
    steps through :meth:`reverse_log_variance`. ``clip_sample`` and thresholding are sampling devices and are
    ignored. The trained range is ``[t_1, t_T]`` (grid ends); outside it ``out_of_range`` decides (module
    docstring): the network is never extrapolated.

    Args:
        model: ``model(x [B, C, H, W], timestep [B]) -> Tensor`` or an object with ``.sample`` (``UNet2DModel``)
            or a tuple whose first entry is the output.
        scheduler: the scheduler's config (dict, ``FrozenDict``) or a diffusers scheduler object.
        prediction_type: overrides the config's ``prediction_type``.
        timesteps: ``"interpolated"`` or ``"nearest"``.
        out_of_range: ``"raise"`` or ``"clamp"``.
        model_kwargs: extra keyword arguments for every model call (e.g. ``class_labels``).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        scheduler: Mapping[str, Any] | Any,
        *,
        prediction_type: str | None = None,
        timesteps: str = "interpolated",
        out_of_range: OutOfRange = "raise",
        model_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        config = scheduler_config_dict(scheduler)
        prediction_type = prediction_type or config.get("prediction_type", "epsilon")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {tuple(_PREDICTION_TYPES)}")
        if timesteps not in _TIMESTEP_MODES:
            raise ValueError(f"timesteps must be one of {_TIMESTEP_MODES}, got {timesteps!r}")
        _check_mode(out_of_range)
        config["prediction_type"] = prediction_type
        self.scheduler_config = config
        self.prediction_type = prediction_type
        self.kind = _PREDICTION_TYPES[prediction_type]
        self.variance_type = str(config.get("variance_type", "fixed_small"))
        self.timesteps = timesteps
        self.out_of_range = out_of_range
        self.model_kwargs = dict(model_kwargs or {})
        self.schedule = DDPMSchedule(betas_from_scheduler_config(config))
        self.zero_terminal_snr = bool(self.schedule.times[-1] >= 1.0)
        if self.zero_terminal_snr and self.kind == "x0":
            raise ValueError("prediction_type 'sample' is undefined at zero terminal SNR (t_T = 1): x0 carries no eps")
        mcfg = getattr(model, "config", None)
        if timesteps == "interpolated" and isinstance(mcfg, Mapping) and mcfg.get("time_embedding_type") == "learned":
            raise ValueError(
                "this network has a learned (table) time embedding: it takes integer timesteps only; "
                "use timesteps='nearest'"
            )
        self.model = model  # an nn.Module is registered as a submodule

    # -------------------------------------------------------------------- grid
    @property
    def num_train_timesteps(self) -> int:
        """Number of training timesteps ``T``."""
        return self.schedule.num_steps

    @property
    def times(self) -> Tensor:
        """Canonical times ``t_j = 1 - alphas_cumprod[j]`` of the timesteps j = 0..T-1, [T] float64."""
        return self.schedule.times

    @property
    def t_range(self) -> tuple[float, float]:
        """Trained range ``(t_1, t_T)`` in canonical time (``t_T = 1`` for zero terminal SNR)."""
        return float(self.times[0]), float(self.times[-1])

    @property
    def lam_range(self) -> tuple[float, float]:
        """Trained log-SNR range ``(lam(t_T), lam(t_1))``, the grid ends, as Python floats.

        Every estimator takes it as its default ``lam_min``/``lam_max``
        (:func:`~scoredensity.epsfn.resolve_lam_range`), so ``log_density(model, x)`` evaluates the network only
        where it was trained instead of raising on [-20, 20]. With zero terminal SNR (``t_T = 1``, log-SNR
        ``-inf``) every lower log-SNR is trained, and the lower end is the library's default,
        ``DEFAULT_LAM_RANGE[0]``.
        """
        t_min, t_max = self.t_range
        lam_hi = math.log1p(-t_min) - math.log(t_min)
        lam_lo = DEFAULT_LAM_RANGE[0] if t_max >= 1.0 else math.log1p(-t_max) - math.log(t_max)
        return lam_lo, lam_hi

    def step_of_t(self, t: Tensor) -> Tensor:
        """Fractional 0-based timestep [B] float64 of canonical ``t`` [B]: the schedule's one map
        (:meth:`~scoredensity.schedules.DDPMSchedule.step_of_t`: log-SNR interpolation, ``sqrt(1 - t)`` on a
        zero-terminal-SNR last interval), clamped to [0, T-1]."""
        return self.schedule.step_of_t(torch.as_tensor(t, dtype=torch.float64))

    def t_of_step(self, j: Tensor) -> Tensor:
        """Canonical time [B] float64 of a fractional 0-based timestep ``j`` (the schedule's map, inverse of
        :meth:`step_of_t`)."""
        return self.schedule.t_of_step(torch.as_tensor(j, dtype=torch.float64))

    # -------------------------------------------------------------------- model calls
    def _model_dtype(self, x: Tensor) -> tuple[torch.dtype, torch.device]:
        if isinstance(self.model, nn.Module):
            p = next(self.model.parameters(), None)
            if p is not None:
                return p.dtype, p.device
        return x.dtype, x.device

    def _check_input(self, x: Tensor) -> None:
        config = getattr(self.model, "config", None)
        if not isinstance(config, Mapping):
            return
        channels = config.get("in_channels")
        if channels is not None and (x.dim() < 2 or x.shape[1] != channels):
            raise ValueError(f"the model takes {channels} channels; got input of shape {tuple(x.shape)}")
        size = config.get("sample_size")
        if size is not None and x.dim() == 4:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(x.shape[2:]) != hw:
                raise ValueError(f"the model takes {hw[0]}x{hw[1]} images; got input of shape {tuple(x.shape)}")

    def model_output(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The raw network output at (fractional or integer) timesteps [B], all channels, in ``x``'s dtype."""
        self._check_input(x)
        dtype, device = self._model_dtype(x)
        out = self.model(x.to(device=device, dtype=dtype), timestep.to(device), **self.model_kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; expected a Tensor or an object with .sample")
        return out.to(device=x.device, dtype=x.dtype)

    def _split(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if out.shape == x.shape:
            if self.variance_type in ("learned", "learned_range"):
                raise ValueError(
                    f"variance_type {self.variance_type!r} needs 2x{x.shape[1]} output channels; got {out.shape[1]}"
                )
            return out, None
        if out.dim() == x.dim() and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            if self.variance_type not in ("learned", "learned_range"):
                raise ValueError(
                    f"the model outputs {out.shape[1]} channels for {x.shape[1]} input channels, but the "
                    f"scheduler's variance_type is {self.variance_type!r} (expected 'learned' or 'learned_range')"
                )
            return out[:, : x.shape[1]], out[:, x.shape[1] :]
        raise ValueError(f"the model returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")

    def eps_at_step(self, x_t: Tensor, step: Tensor) -> Tensor:
        """``eps`` [B, *shape] of the network called at integer timesteps ``step`` [B] (read at ``t_step``):
        the exact discrete-time model, for the DDPM ELBO."""
        step = torch.as_tensor(step, device=x_t.device).long()
        if (step < 0).any() or (step >= self.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        mean, _ = self._split(self.model_output(x_t, step), x_t)
        return eps_from(self.kind, mean, x_t, self.times.to(x_t.device)[step]).to(x_t.dtype)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``eps(x_t [B, *shape], t [B] float64) -> [B, *shape]`` in ``x_t``'s dtype (mean part only)."""
        t = _as_t(t, x_t)
        t_min, t_max = self.t_range
        t = _limit_t(t, t_min, t_max, self.out_of_range, f"this {self.num_train_timesteps}-step diffusers model")
        j = self.step_of_t(t.cpu()).to(x_t.device)
        if self.timesteps == "nearest":
            step = j.round().long()
            return self.eps_at_step(x_t, step)
        near = j.round()
        j = torch.where((j - near).abs() < _SNAP, near, j)
        mean, _ = self._split(self.model_output(x_t, j), x_t)
        return eps_from(self.kind, mean, x_t, t).to(x_t.dtype)

    def eps_and_log_variance(self, x_t: Tensor, t: Tensor, *, clipped: bool = True) -> tuple[Tensor, Tensor]:
        """``eps`` and the reverse step's log-variance, both [B, *shape], from one network call at grid times ``t``
        [B] (canonical ``t_j`` of integer timesteps; the DDPM bound of a learned-variance model).

        ``learned_range`` interpolates ``log b_j`` and the posterior log-variance with ``f = (out + 1) / 2``; with
        ``clipped`` (default, improved-diffusion's ``posterior_log_variance_clipped``) the posterior variance at
        ``j = 0`` is ``beta_tilde_1`` (the next step's), else diffusers' floor 1e-20. ``learned``: the channels are
        the log-variance. Fixed variance types return their constant log-variance.

        Raises:
            ValueError: if ``t`` is not on the training grid.
        """
        t = _as_t(t, x_t)
        j = self.step_of_t(t.cpu()).to(x_t.device)
        step = j.round()
        if ((j - step).abs() > 1e-6).any():
            raise ValueError("eps_and_log_variance needs times on the training grid (integer timesteps)")
        step = step.long()
        mean, var = self._split(self.model_output(x_t, step), x_t)
        eps = eps_from(self.kind, mean, x_t, self.times.to(x_t.device)[step]).to(x_t.dtype)
        large, post = reverse_variances(self.schedule, "fixed_large", "beta")
        if clipped and len(post) > 1:
            post = post.clone()
            post[0] = post[1]
        log_b = large.log().to(x_t.device)[step]
        log_bt = post.clamp_min(1e-20).log().to(x_t.device)[step]
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        vt = self.variance_type
        if vt == "learned":
            lv = var.to(torch.float64)
        elif vt == "learned_range":
            frac = (var.to(torch.float64) + 1) / 2
            lv = frac * log_b.reshape(shape) + (1 - frac) * log_bt.reshape(shape)
        elif vt in ("fixed_small", "fixed_small_log"):
            lv = log_bt.reshape(shape).expand_as(x_t).to(torch.float64)
        elif vt in ("fixed_large", "fixed_large_log"):
            lv = log_b.reshape(shape).expand_as(x_t).to(torch.float64)
        else:
            raise ValueError(f"unknown variance_type {vt!r}")
        return eps, lv

    def reverse_log_variance(self, x_t: Tensor, step: Tensor) -> Tensor:
        """Log-variance [B, *shape] of the reverse step ``p(x_{j-1} | x_j)`` at integer timesteps ``step`` [B],
        as diffusers' ``DDPMScheduler`` defines it for this ``variance_type``.

        ``fixed_small``: ``beta_tilde_j = b_j (1 - abar_{j-1}) / (1 - abar_j)`` (floored at 1e-20 as diffusers
        does at j = 0); ``fixed_large``: ``b_j``; ``learned_range``: ``f log b_j + (1 - f) log beta_tilde_j`` with
        ``f = (out + 1) / 2`` from the variance channels; ``learned``: the log of the variance channels. A model
        evaluated between grid steps has no reverse variance: integer steps only.
        """
        step = torch.as_tensor(step, device=x_t.device).long()
        large, post = reverse_variances(self.schedule, "fixed_large", "beta")  # (b_j, beta_tilde_j), float64
        beta = large.to(x_t.device)[step]
        beta_tilde = post.to(x_t.device)[step].clamp_min(1e-20)
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        vt = self.variance_type
        if vt in ("fixed_small", "fixed_small_log"):
            return beta_tilde.log().reshape(shape).expand_as(x_t).to(x_t.dtype)
        if vt in ("fixed_large", "fixed_large_log"):
            return beta.log().reshape(shape).expand_as(x_t).to(x_t.dtype)
        if vt not in ("learned", "learned_range"):
            raise ValueError(f"unknown variance_type {vt!r}")
        _, var = self._split(self.model_output(x_t, step), x_t)
        if vt == "learned":
            return var.log()
        frac = (var.to(torch.float64) + 1) / 2
        out = frac * beta.log().reshape(shape) + (1 - frac) * beta_tilde.log().reshape(shape)
        return out.to(x_t.dtype)
