"""Bits per dimension of an image model: the density formula (discrete and dequantised) and the DDPM ELBO.

For a discrete-time model trained on ``[t_1, t_T]`` (docs/design.md §2) the network is only evaluated
inside that range: the formula runs on ``[lam(t_T), lam(t_1)]`` with its exact end terms, and

* **discrete** (no dequantisation): the clean end is DDPM's discretised Gaussian decoder at ``t_1``, so
  ``-log P(k) <= E[-log p_dec(k | x_{t_1})] + 1/2 ∫ E||z - eps||^2 dlam + KL(q(x_{t_T} | x) || N(0, I))``;
* **dequantised**: data ``x = 2(k + u - 1/2)/(L - 1) - 1``, ``u ~ U[0, 1)``, with the Gaussian reconstruction
  term of VDM at the clean end; bits/dim add ``log2((L - 1) / 2)`` (the bin width on the [-1, 1] scale);
* **ddpm**: the T-step DDPM ELBO with the model's own reverse variance and the discretised decoder.

Every figure is split into VDM's three costs (prior, diffusion, reconstruction; :func:`vdm_terms`).

Scale: the images are streamed in blocks of ``batch_size`` to the model's device, so memory does not grow with
their number; per-example results are keyed by the example's global index and every random draw by
``(seed, index, round)`` (:mod:`scoredensity.rng`), and the log-SNR proposal is fitted once on the first
examples, so the figures are the same in one batch, many batches, sharded over processes
(``torch.distributed``: each process evaluates ``index % world == rank``), or resumed from a
:class:`~scoredensity.eval_store.ResultStore` after a kill. ``target_se`` spends calls in rounds (the rng
``step`` counter is the round) until the data set's standard error is small enough.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import rng
from .conventions import Convention, get_convention
from .data.dataset import levels_to_unit_scale
from .ddpm import ddpm_elbo
from .epsfn import PRECISIONS, EpsFn, check_int
from .eval_store import ResultStore, evaluate_rounds, round_stats
from .formula import fit_proposal, log_density
from .logdensity import LogDensity
from .ode import ode_log_likelihood
from .schedules import DDPMSchedule, logsnr_from_t

__all__ = [
    "evaluate_images",
    "IMAGE_METHODS",
    "DEFAULT_IMAGE_METHODS",
    "CONVENTION_METHODS",
    "ImageEvalSettings",
    "image_eval_settings",
    "vdm_terms",
    "data_hash",
    "model_device",
    "record_keys",
    "image_layout",
    "to_nchw",
]

IMAGE_METHODS = ("formula-discrete", "formula-dequantized", "ddpm", "ode-dequantized")
# the ODE method's trace: exact (d vjps per call) or Hutchinson with ODE_PROBES Gaussian probes (an honest stderr)
ODE_TRACES = ("exact", "hutchinson")
ODE_PROBES = 8
# what evaluate_images does when a convention's log-SNR range exceeds the model's trained range
CONVENTION_RANGES = ("refuse", "clip")
DEFAULT_IMAGE_METHODS = ("formula-discrete", "formula-dequantized", "ddpm")
"""The methods evaluated when none are named (the probability-flow ODE is opt-in: it costs far more)."""
CONVENTION_METHODS = {"vdm": ("formula-discrete",), "score-sde": ("ode-dequantized",)}
"""The image-evaluation method of each continuous published convention."""
_T_MAX_CAP = 1 - 1e-9  # a zero-terminal-SNR grid ends at t = 1 (log-SNR -inf); stay just inside it
_VALUES = ("logp", "stderr", "prior", "diffusion", "reconstruction", "nfe")  # the per-example record of one method
_PILOT_EXAMPLES, _PILOT_NODES = 16, 8
_ROUND_SHIFT = 40  # round r keys the estimators' draws with example id + r * 2^40 (ids stay below 2^40)


def data_hash(levels_data: Tensor, block: int = 4096) -> str:
    """SHA-256 of integer image data (as int64, C order) with its shape: identifies the evaluated set.

    Computed in blocks of ``block`` examples, so a large set is never copied to int64 whole."""
    h = hashlib.sha256(str(tuple(levels_data.shape)).encode())
    for s in range(0, levels_data.shape[0], block):
        h.update(levels_data[s : s + block].to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def model_device(eps_fn: EpsFn) -> torch.device:
    """The device of the model's parameters (the first one found on ``eps_fn`` or its ``.model``), else CPU."""
    for obj in (eps_fn, getattr(eps_fn, "model", None)):
        params = getattr(obj, "parameters", None)
        if callable(params):
            try:
                return next(iter(params())).device
            except (StopIteration, TypeError):
                continue
    return torch.device("cpu")


def image_layout(shape: Sequence[int], channels: int, size: Sequence[int] | None = None) -> str:
    """The layout of an image array of ``shape`` for a model with ``channels`` input channels and (optionally)
    spatial ``size`` (H, W): ``"NCHW"``, ``"NHWC"`` (improved/guided-diffusion sample files, ``arr_0``) or ``"NHW"``
    (greyscale, one channel).

    Raises:
        ValueError: a shape that fits no layout, or fits both NCHW and NHWC (a clear message saying which).
    """
    shape = tuple(int(v) for v in shape)
    size = None if size is None else tuple(int(v) for v in size)
    if len(shape) == 3:
        if channels != 1:
            raise ValueError(
                f"images of shape {shape} (N, H, W: greyscale) do not fit a model with {channels} channels"
            )
        if size is not None and shape[1:] != size:
            raise ValueError(f"images of shape {shape} (N, H, W) do not fit the model's {size[0]}x{size[1]} images")
        return "NHW"
    if len(shape) != 4:
        raise ValueError(f"images must be [N, C, H, W], [N, H, W, C] or [N, H, W]; got shape {shape}")
    fits = []
    if shape[1] == channels and (size is None or shape[2:] == size):
        fits.append("NCHW")
    if shape[3] == channels and (size is None or shape[1:3] == size):
        fits.append("NHWC")
    if not fits:
        want = f"{channels} channels" + ("" if size is None else f" of {size[0]}x{size[1]}")
        raise ValueError(f"images of shape {shape} fit neither NCHW nor NHWC for a model with {want}")
    if len(fits) == 2:
        raise ValueError(
            f"images of shape {shape} are ambiguous for a model with {channels} channels: both NCHW and NHWC fit; "
            "save them as NCHW with a different shape, or transpose them yourself"
        )
    return fits[0]


def to_nchw(a: Tensor, layout: str) -> Tensor:
    """``a`` in ``layout`` (:func:`image_layout`) as [N, C, H, W] (a view when possible)."""
    if layout == "NHW":
        return a[:, None]
    if layout == "NHWC":
        return a.permute(0, 3, 1, 2)
    if layout == "NCHW":
        return a
    raise ValueError(f"unknown layout {layout!r}")


def record_keys(methods: Sequence[str]) -> list[str]:
    """The per-example values stored for ``methods``: ``"<method>/<value>"`` for logp, stderr and the VDM terms."""
    return [f"{m}/{v}" for m in methods for v in _VALUES]


@dataclasses.dataclass(frozen=True)
class ImageEvalSettings:
    """Everything that determines the figures of :func:`evaluate_images` (validated; see its Args)."""

    levels: int
    methods: tuple[str, ...]
    t_range: tuple[float, float]
    lam_min: float
    lam_max: float
    n_t: int
    decoder_draws: int
    ddpm_steps: int | None
    variance: str | None
    seed: int
    precision: str
    max_batch: int | None
    schedule: DDPMSchedule | None = dataclasses.field(default=None, compare=False)
    convention: dict | None = None
    ode_tol: float = 1e-5
    ode_trace: str = "exact"
    convention_range: str = "refuse"
    convention_clipped: bool = False

    def as_dict(self) -> dict:
        """JSON-serialisable settings (the schedule as its number of steps)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "schedule"}
        d["T"] = None if self.schedule is None else self.schedule.num_steps
        return d


def image_eval_settings(
    eps_fn: EpsFn,
    images: Tensor,
    *,
    levels: int = 256,
    t_range: tuple[float, float] | None = None,
    methods: Sequence[str] = DEFAULT_IMAGE_METHODS,
    schedule: DDPMSchedule | None = None,
    variance: str | None = None,
    n_t: int = 32,
    decoder_draws: int = 4,
    ddpm_steps: int | None = 50,
    seed: int = 0,
    precision: str = "fp32",
    max_batch: int | None = None,
    convention: str | Convention | None = None,
    ode_tol: float = 1e-5,
    ode_trace: str = "exact",
    convention_range: str = "refuse",
) -> ImageEvalSettings:
    """Check the options of :func:`evaluate_images` against the model and the images; fill in the model's own
    range, schedule and variance. Raises ``ValueError``/``TypeError`` naming the offending option."""
    conv = _check_convention(convention, methods, levels)
    if not isinstance(images, Tensor) or images.dtype.is_floating_point or images.dim() < 2:
        raise TypeError("images must be an integer tensor of levels [N, *shape]")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(f"image levels must lie in 0..{levels - 1}; found [{lo}, {hi}]")
    methods = tuple(methods)
    unknown = set(methods) - set(IMAGE_METHODS)
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {IMAGE_METHODS}; unknown: {sorted(unknown)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n_t = check_int("n_t", n_t, 2)
    decoder_draws = check_int("decoder_draws", decoder_draws, 1)
    ddpm_steps = check_int("ddpm_steps", ddpm_steps, 4, allow_none=True)
    max_batch = check_int("max_batch", max_batch, 1, allow_none=True)
    if isinstance(ode_tol, bool) or not isinstance(ode_tol, (int, float)) or not 0 < ode_tol < 1:
        raise ValueError(f"ode_tol must be a number in (0, 1) (rtol = atol of the ODE solver), got {ode_tol!r}")
    if ode_trace not in ODE_TRACES:
        raise ValueError(f"ode_trace must be one of {ODE_TRACES}, got {ode_trace!r}")
    if convention_range not in CONVENTION_RANGES:
        raise ValueError(f"convention_range must be one of {CONVENTION_RANGES}, got {convention_range!r}")
    if t_range is None:
        t_range = getattr(eps_fn, "t_range", None)
        if t_range is None:
            raise ValueError("t_range=(t_1, t_T) is required for a model without a .t_range")
    t_lo, t_hi = float(t_range[0]), min(float(t_range[1]), _T_MAX_CAP)
    lam_min = float(logsnr_from_t(torch.tensor(t_hi, dtype=torch.float64)))
    lam_max = float(logsnr_from_t(torch.tensor(t_lo, dtype=torch.float64)))
    if "ddpm" in methods:
        schedule = schedule if schedule is not None else getattr(eps_fn, "schedule", None)
        if schedule is None:
            raise ValueError("the 'ddpm' method needs schedule= (a DDPMSchedule) for a model without .schedule")
        if getattr(eps_fn, "zero_terminal_snr", False):
            raise ValueError(
                "the DDPM ELBO is undefined for a zero-terminal-SNR schedule (t_T = 1); use the formula methods only"
            )
        if conv is not None and conv.name != "improved-diffusion":
            variance = variance or conv.variance  # improved-diffusion evaluates each model with its own variance
        variance = variance or getattr(eps_fn, "variance_type", "fixed_small")
        variance = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}.get(variance, variance)
        learned = variance in ("learned_range", "learned")
        if variance not in ("fixed_small", "fixed_large") and not learned:
            raise ValueError(f"variance must be fixed_small, fixed_large, learned_range or learned; got {variance!r}")
        if learned and not callable(getattr(eps_fn, "eps_and_log_variance", None)):
            raise ValueError(
                f"the DDPM ELBO of a model with variance_type {variance!r} needs its learned reverse variances "
                "(a DiffusersEps of a learned-variance model); use methods without 'ddpm'"
            )
    else:
        schedule, variance = None, None
    clipped = False
    if conv is not None and conv.lam_range is not None:
        lam_min, lam_max = _convention_lam_range(eps_fn, conv, (lam_min, lam_max), clip=convention_range == "clip")
        clipped = (lam_min, lam_max) != tuple(conv.lam_range)
    return ImageEvalSettings(
        levels=int(levels),
        methods=methods,
        t_range=(t_lo, t_hi),
        lam_min=lam_min,
        lam_max=lam_max,
        n_t=n_t,
        decoder_draws=decoder_draws,
        ddpm_steps=ddpm_steps,
        variance=variance,
        seed=int(seed),
        precision=precision,
        max_batch=max_batch,
        schedule=schedule,
        convention=None if conv is None else conv.as_dict(),
        ode_tol=float(ode_tol),
        ode_trace=ode_trace,
        convention_range=convention_range,
        convention_clipped=clipped,
    )


def _check_convention(convention, methods: Sequence[str], levels: int) -> Convention | None:
    """The :class:`~scoredensity.conventions.Convention` of an image evaluation, checked against the methods.

    ``ddpm`` and ``improved-diffusion`` define the DDPM bound (method ``ddpm`` only); ``scoredensity`` is this
    library's own (every method); ``vdm`` is the density formula with its categorical decoder (method
    ``formula-discrete`` only) and ``score-sde`` the probability-flow ODE on dequantised data (method
    ``ode-dequantized`` only), each on its own 2/256 grid (:data:`CONVENTION_METHODS`)."""
    if convention is None:
        return None
    conv = get_convention(convention)
    if conv.name in CONVENTION_METHODS:
        allowed = CONVENTION_METHODS[conv.name]
        if tuple(methods) != allowed:
            raise ValueError(
                f"convention {conv.name!r} ({conv.estimator}, {conv.clean_end} clean end) is evaluated by the method "
                f"{allowed[0]!r} only: use methods={allowed}, not {tuple(methods)}"
            )
    elif conv.name != "scoredensity" and conv.time != "discrete":
        raise ValueError(
            f"convention {conv.name!r} ({conv.estimator}, {conv.clean_end} clean end) is not available in the image "
            f"evaluation; it has: ddpm, improved-diffusion, scoredensity, {', '.join(CONVENTION_METHODS)}"
        )
    formula = [m for m in methods if m.startswith("formula")]
    if conv.time == "discrete" and formula:
        raise ValueError(f"convention {conv.name!r} defines the DDPM bound only: use methods ('ddpm',), not {formula}")
    if conv.levels != levels:
        raise ValueError(f"convention {conv.name!r} is defined on {conv.levels} levels; the images have {levels}")
    return conv


def _convention_lam_range(
    eps_fn: EpsFn, conv: Convention, trained: tuple[float, float], *, clip: bool = False
) -> tuple[float, float]:
    """The convention's log-SNR range, checked to lie within the model's trained range (``eps_fn.lam_range``,
    else the range of its ``t_range``). Beyond it: ``ValueError`` naming both ranges, or with ``clip`` their
    intersection (then the figure is no longer the convention's own, and the result says so)."""
    lo, hi = conv.lam_range
    model = getattr(eps_fn, "lam_range", None)
    m_lo, m_hi = (float(v) for v in (model if model is not None else trained))
    if lo < m_lo - 1e-9 or hi > m_hi + 1e-9:
        if clip and max(lo, m_lo) < min(hi, m_hi):
            return max(lo, m_lo), min(hi, m_hi)
        raise ValueError(
            f"convention {conv.name!r} needs the log-SNR range [{lo:.4g}, {hi:.4g}], beyond the model's trained range "
            f"[{m_lo:.4g}, {m_hi:.4g}]: the network would be called where it was not trained"
            + ("" if clip else "; convention_range='clip' (--clip-convention-range) evaluates on their intersection")
        )
    return lo, hi


def vdm_terms(r: LogDensity, method: str, d: int, lam_min: float, lam_max: float) -> dict[str, Tensor]:
    """VDM's split of a per-example log-density into ``prior``, ``diffusion`` and ``reconstruction`` [B] (nats;
    they add up to ``r.logp``).

    The formula's terms are regrouped: its noisy end carries ``-(d/2) softplus(lam_min)`` and its clean end
    ``+(d/2) softplus(lam_max)`` of the integral's closed-form part, which VDM counts in the diffusion term."""
    if method.startswith("ode"):
        return {"prior": r.terms["prior"], "diffusion": r.terms["flow"], "reconstruction": torch.zeros_like(r.logp)}
    if not method.startswith("formula"):
        return {"prior": r.terms["prior"], "diffusion": r.terms["diffusion"], "reconstruction": r.terms["decoder"]}
    sp_min, sp_max = (float(F.softplus(torch.tensor(v, dtype=torch.float64))) for v in (lam_min, lam_max))
    return {
        "prior": r.terms["noisy_end"] - 0.5 * d * sp_min,
        "diffusion": r.terms["integral"] - 0.5 * d * (sp_max - sp_min),
        "reconstruction": r.terms["clean_end"] + 0.5 * d * sp_max,
    }


def pilot_images(k: Tensor, s: ImageEvalSettings) -> Tensor:
    """The pilot examples [b, *shape] float32 of the shared importance proposal, from integer levels ``k``: on the
    convention's grid (``vdm``: ``2(k + 1/2)/L - 1``), else ``2k/(L-1) - 1``."""
    if s.convention is not None and s.convention["name"] == "vdm":
        return (2 * (k.double() + 0.5) / s.levels - 1).float()
    return levels_to_unit_scale(k, s.levels).float()


def round_keys(ids: Tensor, round_: int) -> Tensor:
    """The estimators' random-stream keys of examples ``ids`` in round ``round_`` (round 0: the ids themselves)."""
    return ids + (int(round_) << _ROUND_SHIFT)


def _block_records(
    eps_fn: EpsFn, s: ImageEvalSettings, proposal, images: Tensor, ids: Tensor, round_: int, device: torch.device
) -> dict[str, Tensor]:
    """Per-example records (:func:`record_keys`) of the examples ``ids`` of ``images`` in round ``round_``."""
    k = images[ids].to(device)  # [b, *shape] integer levels
    d = k[0].numel()
    keys = round_keys(ids, round_)
    grid = levels_to_unit_scale(k, s.levels).float()
    conv = None if s.convention is None else s.convention["name"]
    out: dict[str, Tensor] = {}
    # every estimator: keyed by (seed, example, round), on the settings' precision and rows per call; the formula
    # rows also share the range, budget and pilot proposal. Under vdm / score-sde, s.lam_min/lam_max are the
    # convention's own range (or its clipped one, which the estimators then name in their info)
    keyed = dict(seed=s.seed, example_ids=keys, precision=s.precision, max_batch=s.max_batch)
    formula = dict(
        lam_min=s.lam_min,
        lam_max=s.lam_max,
        n_t=s.n_t,
        importance=proposal,
        control_variate=None,
        progress=False,
        **keyed,
    )
    for m in s.methods:
        if conv == "vdm":  # VDM's grid 2(k + 1/2)/L - 1 and categorical decoder; the convention's log-SNR range
            x = (2 * (k.double() + 0.5) / s.levels - 1).float()
            r = log_density(eps_fn, x, convention="vdm", **formula)
        elif m == "ode-dequantized":
            u = rng.uniforms(s.seed, rng.Stream.DEQUANT, ids, d, step=round_, device=device).reshape(k.shape)
            if conv == "score-sde":  # score_sde's grid: (255 x + u)/256 on [0, 1], i.e. bins of 2/256 on [-1, 1]
                x = (2 * (k.double() + u.double()) / 256 - 1).float()
            else:
                x = levels_to_unit_scale(k, s.levels, u).float()
            with torch.enable_grad():
                r = ode_log_likelihood(
                    eps_fn,
                    x,
                    convention=conv if conv == "score-sde" else None,
                    rtol=s.ode_tol,
                    atol=s.ode_tol,
                    trace=s.ode_trace,
                    **({"probe": "gaussian", "n_probes": ODE_PROBES} if s.ode_trace == "hutchinson" else {}),
                    lam_min=s.lam_min,
                    lam_max=s.lam_max,
                    progress=False,
                    **keyed,
                )
        elif m == "ddpm":
            r = ddpm_elbo(
                eps_fn,
                grid,
                schedule=s.schedule,
                convention=None if s.convention is None else s.convention["name"],
                variance=s.variance,
                decoder="discretized",
                levels=s.levels,
                n_steps_sampled=s.ddpm_steps,
                **keyed,
            )
        else:
            if m == "formula-discrete":
                r = log_density(
                    eps_fn, grid, decoder="discretized", levels=s.levels, decoder_draws=s.decoder_draws, **formula
                )
            else:
                u = rng.uniforms(s.seed, rng.Stream.DEQUANT, ids, d, step=round_, device=device).reshape(k.shape)
                r = log_density(eps_fn, levels_to_unit_scale(k, s.levels, u).float(), **formula)
        nfe = torch.full_like(r.logp, float(r.nfe), dtype=torch.float64)
        vals = {"logp": r.logp, "stderr": r.stderr, "nfe": nfe, **vdm_terms(r, m, d, s.lam_min, s.lam_max)}
        for v in _VALUES:
            out[f"{m}/{v}"] = vals[v].detach().to(torch.float64).cpu()
    return out


def _method_figures(tables: list[dict[str, Tensor]], m: str, d: int, s: ImageEvalSettings, pilot_nfe: float) -> dict:
    """The figures of method ``m`` from the per-round record tables (each ``{key: [N]}``)."""
    to_bits = 1.0 / (d * math.log(2))
    kind = "dequantized" if m.endswith("-dequantized") else "discrete"
    conv = None if s.convention is None else s.convention
    if conv is not None and conv["name"] in CONVENTION_METHODS:
        offset = float(conv["bits_offset"])  # score-sde: 7 (bins of 2/256); vdm: 0 (a categorical probability)
    else:
        offset = math.log2((s.levels - 1) / 2) if kind == "dequantized" else 0.0
    logp, est_se, stated_se = round_stats([t[f"{m}/logp"] for t in tables], [t[f"{m}/stderr"] for t in tables])
    n = logp.shape[0]
    bpd = -logp * to_bits + offset  # [N]
    nfe = float(sum(t[f"{m}/nfe"].mean() for t in tables)) + (pilot_nfe if m.startswith("formula") else 0.0)
    fig = {
        "kind": kind,
        "bpd": float(bpd.mean()),
        "bpd_stderr": float(bpd.std() / math.sqrt(n)) if n > 1 else est_se * to_bits,
        "bpd_estimator_stderr": est_se * to_bits,
        "bpd_estimator_stderr_stated": stated_se * to_bits,
        "nll_nats": float(-logp.mean()),
        "nfe_per_example": nfe,
        "rounds": len(tables),
        # VDM-style split in bits per dimension (each a cost: positive is worse)
        "terms_bpd": {v: float(-torch.stack([t[f"{m}/{v}"] for t in tables]).mean() * to_bits) for v in _VALUES[2:5]},
    }
    if kind == "dequantized":
        fig["bpd_offset_dequantization"] = offset
    if m.startswith("formula"):
        fig["n_t"] = s.n_t
    elif m.startswith("ode"):
        pass
    else:
        fig.update(variance=s.variance, T=s.schedule.num_steps, steps_sampled=s.ddpm_steps)
        if s.convention is not None:
            c = s.convention
            fig["convention"] = c["name"] + ("" if s.variance == c["variance"] else f"+variance={s.variance}")
    if conv is not None and conv["name"] in CONVENTION_METHODS:
        fig["convention"] = conv["name"]
        if s.convention_clipped:  # no longer the published figure: name the change, as the estimators do
            fig["convention"] += f"+lam_range=[{s.lam_min:.4g}, {s.lam_max:.4g}]"
        fig["grid"] = conv["grid"]
    return fig


@torch.no_grad()
def evaluate_images(
    eps_fn: EpsFn,
    images: Tensor,
    *,
    levels: int = 256,
    t_range: tuple[float, float] | None = None,
    methods: Sequence[str] = DEFAULT_IMAGE_METHODS,
    schedule: DDPMSchedule | None = None,
    variance: str | None = None,
    n_t: int = 32,
    decoder_draws: int = 4,
    ddpm_steps: int | None = 50,
    seed: int = 0,
    batch_size: int = 16,
    precision: str = "fp32",
    max_batch: int | None = None,
    target_se: float | None = None,
    max_rounds: int = 64,
    store: ResultStore | None = None,
    convention: str | Convention | None = None,
    ode_tol: float = 1e-5,
    ode_trace: str = "exact",
    convention_range: str = "refuse",
    progress: bool = True,
) -> dict:
    """Bits per dimension of integer images under a canonical-time model, by several estimators.

    Computes on the device of the model's parameters (:func:`model_device`); the images may stay on the CPU
    and are moved there ``batch_size`` at a time.

    Args:
        eps_fn: the model in canonical time (e.g. :class:`~scoredensity.adapters.DiffusersEps`; its ``t_range``,
            ``schedule`` and ``variance_type`` are used when not given).
        images: [N, C, H, W] integer levels in ``0..levels-1``.
        levels: ``L`` (256 for 8-bit images); the model sees ``x = 2k/(L-1) - 1``.
        t_range: ``(t_1, t_T)``, the trained range; the network is never called outside it.
        methods: subset of ``formula-discrete``, ``formula-dequantized``, ``ddpm`` (the default) and
            ``ode-dequantized`` (the probability-flow ODE on dequantised data, ``ode_tol`` and ``ode_trace``:
            opt-in, costly).
        schedule: the T-step grid for ``ddpm`` (default ``eps_fn.schedule``).
        variance: ``fixed_small`` / ``fixed_large`` / ``learned_range`` / ``learned`` for ``ddpm`` (default the
            model's ``variance_type``; the learned ones read the model's variance channels).
        n_t: log-SNR nodes per example for the formula (each one network call).
        decoder_draws: z draws for the discretised decoder term.
        ddpm_steps: KL terms sampled per example for ``ddpm`` (unbiased); ``None`` sums all T.
        seed: keys every random stream together with the example's index and the round.
        batch_size: examples per estimator call (bounds memory together with ``max_batch``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the network only; sums stay in float64.
        max_batch: rows per network call (default: the estimators' memory budget).
        target_se: evaluate in rounds of independent draws (round ``r`` keys its draws with ``r``) until every
            method's data-set estimator standard error (``bpd_estimator_stderr``, bits/dim, from the spread
            between rounds) is at most ``target_se``; ``None``: one round.
        max_rounds: the most rounds ``target_se`` may spend (a warning in the result if it stops short).
        store: a :class:`~scoredensity.eval_store.ResultStore` with keys :func:`record_keys` ``(methods)``:
            records already in it are not recomputed (resume), new ones are written as they are done.
        convention: a published convention (:mod:`scoredensity.conventions`) or its name: ``"ddpm"`` or
            ``"improved-diffusion"`` (the DDPM bound as published: decoder variance, clipping, CDF; method ``ddpm``
            only; improved-diffusion keeps the model's own reverse variance, ``ddpm`` uses fixed_large),
            ``"vdm"`` (method ``formula-discrete`` only: levels at ``2(k + 1/2)/256 - 1``, categorical decoder,
            log-SNR [-5, 13.3], no offset), ``"score-sde"`` (method ``ode-dequantized`` only: ``2(k + u)/256 - 1``,
            log-SNR [-10.05, 13.82], bits/dim + 7) or ``"scoredensity"``. vdm and score-sde are refused when
            their log-SNR range exceeds the model's trained range (``eps_fn.lam_range``), unless
            ``convention_range="clip"``.
            The result names it and lists its choices; ``None``: the defaults above.
        ode_tol: ``rtol = atol`` of the ``ode-dequantized`` method's adaptive solver (dopri5; every image meets it).
        ode_trace: its trace: ``"exact"`` (one vjp per dimension per call: costly for large images) or
            ``"hutchinson"`` (:data:`ODE_PROBES` Gaussian probes per image; their spread enters the standard error).
        convention_range: ``"refuse"`` (default) or ``"clip"``: evaluate vdm / score-sde on the intersection of the
            convention's log-SNR range and the model's trained range. The figure is then not the published one: each
            method's ``convention`` reads e.g. ``"vdm+lam_range=[-5, 9.21]"``.
        progress: a progress bar on a terminal, else periodic plain lines on stderr.

    Returns:
        A JSON-serialisable dict: per method ``bpd`` (mean), ``bpd_stderr`` (standard error of the mean over the
        examples, covering the estimator's noise too), ``bpd_estimator_stderr`` (the estimator's part alone),
        ``nfe_per_example`` (network calls per image, all rounds and the shared pilot included), ``rounds``,
        ``kind`` (*discrete* or *dequantized*) and ``terms_bpd`` (prior, diffusion, reconstruction); plus
        ``settings``, ``preprocessing``, ``data_sha256``, ``n``, ``device``, the log-SNR range used, and
        ``convention`` (``None`` or every choice of the convention; the ``ddpm`` method also names the choices it
        applied, with any explicit change, as ``convention``).
    """
    s = image_eval_settings(
        eps_fn,
        images,
        levels=levels,
        t_range=t_range,
        methods=methods,
        schedule=schedule,
        variance=variance,
        n_t=n_t,
        decoder_draws=decoder_draws,
        ddpm_steps=ddpm_steps,
        seed=seed,
        precision=precision,
        max_batch=max_batch,
        convention=convention,
        ode_tol=ode_tol,
        ode_trace=ode_trace,
        convention_range=convention_range,
    )
    batch_size = check_int("batch_size", batch_size, 1)
    max_rounds = check_int("max_rounds", max_rounds, 2 if target_se is not None else 1)
    if target_se is not None and not (isinstance(target_se, (int, float)) and target_se > 0):
        raise ValueError(f"target_se must be a positive number of bits/dim, got {target_se!r}")
    n, d = images.shape[0], images[0].numel()
    device = model_device(eps_fn)
    if store is None:
        store = ResultStore(record_keys(s.methods))
    elif store.keys != record_keys(s.methods):
        raise ValueError(f"store keys {store.keys[:3]}... do not match the methods {s.methods}")

    proposal = None
    uses_proposal = any(m.startswith("formula") for m in s.methods)
    if uses_proposal:
        # one proposal for every block, round and process: fitted on the same first examples everywhere
        pilot = pilot_images(images[: min(n, _PILOT_EXAMPLES)].to(device), s)
        proposal = fit_proposal(
            eps_fn,
            pilot,
            lam_min=s.lam_min,
            lam_max=s.lam_max,
            seed=s.seed,
            pilot_examples=_PILOT_EXAMPLES,
            pilot_nodes=_PILOT_NODES,
            precision=s.precision,
        )
    pilot_nfe = min(n, _PILOT_EXAMPLES) * _PILOT_NODES / n if uses_proposal else 0.0

    def compute_round(r: int):
        return lambda ids: _block_records(eps_fn, s, proposal, images, ids, r, device)

    def se_of(tables: list[dict[str, Tensor]]) -> float:
        return max(_method_figures(tables, m, d, s, 0.0)["bpd_estimator_stderr"] for m in s.methods)

    tables, target = evaluate_rounds(
        compute_round,
        n,
        store,
        batch_size=batch_size,
        se_of=se_of,
        target_se=target_se,
        max_rounds=max_rounds,
        progress=progress,
        unit="images",
    )
    out: dict = {
        "n": n,
        "shape": list(images.shape[1:]),
        "levels": s.levels,
        "data_sha256": data_hash(images),
        "lam_range": [s.lam_min, s.lam_max],
        "t_range": list(s.t_range),
        "seed": s.seed,
        "world_size": store.world,
        "device": str(device),
        "precision": s.precision,
        "max_batch": s.max_batch,
        "settings": s.as_dict(),
        "convention": s.convention,
        "preprocessing": {
            "scaling": f"x = 2k/({s.levels}-1) - 1 (k integer levels in 0..{s.levels - 1})",
            "dequantization": "formula-dequantized and ode-dequantized: x = 2(k + u - 1/2)/(L-1) - 1, u ~ U[0,1) "
            "keyed by (seed, example index, round); bpd adds log2((L-1)/2) (convention score-sde: "
            "x = 2(k + u)/256 - 1, bpd adds 7; vdm: x = 2(k + 1/2)/256 - 1 with a categorical decoder, no offset)",
            "discrete": "formula-discrete and ddpm: discretised Gaussian decoder, no dequantisation",
        },
        "methods": {},
    }
    if target is not None:
        out["target_se"] = target
    for m in s.methods:
        out["methods"][m] = _method_figures(tables, m, d, s, pilot_nfe)
    store.finish(out, n)
    return out
