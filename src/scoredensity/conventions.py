"""Published evaluation conventions, named: every choice that moves a bits/dim figure, in one record.

A likelihood figure of a diffusion model depends on more than the model: discrete or continuous time, the
reverse variance, the decoder's variance, whether the denoised image is clipped, how the normal CDF is computed,
the data grid (bin width), the constant added to turn a density into bits/dim, the log-SNR range and where the
prior sits. Each paper fixed these differently. A :class:`Convention` names one paper's choices so that a number
can be reproduced and compared ("3.70 bits/dim, convention ddpm"). The settings below were read from the
authors' public code:

* ``ddpm`` (Ho et al. 2020, ``diffusion_tf/diffusion_utils_2.py``): T discrete steps; ``fixedlarge`` reverse
  variance ``b_k`` except at the decoder, whose variance is the posterior variance ``sigma~_2^2``
  (``np.append(posterior_variance[1], betas[1:])``); ``calc_bpd_loop`` clips the predicted ``x_0`` to [-1, 1]
  (``clip_denoised=True``); discretised Gaussian decoder on ``x = 2k/255 - 1`` with bins ``x ± 1/255``;
  no offset (the decoder gives a probability). Their decoder uses a tanh approximation of the normal CDF
  (``cdf="tanh"`` reproduces it bit for bit; the default here is the exact CDF, 0.0024 bits/dim apart at T=1000).
* ``improved-diffusion`` (Nichol & Dhariwal 2021, ``improved_diffusion/gaussian_diffusion.py``,
  ``scripts/image_nll.py``): the same bound and decoder as ``ddpm`` for ``fixed_large``; ``fixed_small`` uses the
  posterior variance with ``sigma~_1^2`` clipped to ``sigma~_2^2``; ``learned_range`` interpolates the two in
  log space with the model's extra channels. ``image_nll.py`` evaluates with ``clip_denoised=True``.
* ``score-sde`` (Song et al. 2021, ``likelihood.py``): probability-flow ODE of the VP-SDE with ``beta`` linear in
  [0.1, 20]; integrated from ``s = 1e-5`` (the data, no noise added) to ``s = 1`` where the prior ``N(0, I)``
  sits (log-SNR about -10.05); data dequantised as ``(255 x + u) / 256`` on [0, 1], i.e. bins of width
  ``2/256`` on [-1, 1], and bits/dim ``+ 7`` (``7 - inverse_scaler(-1)``).
* ``vdm`` (Kingma et al. 2021, ``model_vdm.py``, ``configs/cifar10.py``): continuous time, the continuous ELBO
  (the density formula with the model's eps), prior KL at ``gamma_max = 5`` (log-SNR -5) and the clean end at
  ``gamma_min = -13.3`` (log-SNR 13.3) for its initial schedule; pixels encoded as ``2 (k + 1/2) / 256 - 1``
  (bin width 2/256) and a *categorical* decoder: ``p(k | z_0)`` proportional to
  ``N(z_0 / alpha_0; x_k, sigma_0^2 / alpha_0^2)`` normalised over the 256 values; no offset.
* ``scoredensity``: this library's own defaults, named so that its figures say so: the density formula on the
  model's own log-SNR range (else [-20, 20]) with the prior KL at ``lam_min``, discretised Gaussian decoder with
  the exact CDF on ``x = 2k/(L-1) - 1``; for ``ddpm_elbo`` the reverse variance ``fixed_large`` with decoder
  variance ``b_1`` and no clipping.

Use :func:`get_convention` and :meth:`Convention.replace` to vary one choice; :meth:`Convention.as_dict` lists
every choice for JSON output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .schedules import VPLinearClock

__all__ = ["Convention", "CONVENTIONS", "get_convention", "TIMES", "CDFS", "DECODER_VARIANCES", "CLEAN_ENDS"]

TIMES = ("discrete", "continuous")
CDFS = ("exact", "tanh")
DECODER_VARIANCES = ("model", "beta", "posterior")
"""``model``: the reverse variance's own step-1 value; ``beta``: ``b_1``; ``posterior``: ``sigma~_2^2``
(the published ``fixed_large`` decoder variance)."""
CLEAN_ENDS = ("discretized", "categorical", "dequantized", "gaussian")
"""How the clean end is scored: a discretised Gaussian (bin masses by the normal CDF), VDM's categorical
Gaussian (normalised over the levels), a continuous density of dequantised data, or a Gaussian density of
continuous data."""


@dataclass(frozen=True)
class Convention:
    """One paper's evaluation choices (see the module docstring).

    Attributes:
        name: the convention's name (``get_convention(name)``).
        time: ``"discrete"`` (a T-step DDPM bound, :func:`scoredensity.ddpm_elbo`) or ``"continuous"``
            (density formula / continuous ELBO, or the probability-flow ODE).
        estimator: the estimator of the published figure: ``"ddpm_elbo"``, ``"formula"`` or ``"ode"``.
        variance: discrete time: reverse variance ``"fixed_large"``, ``"fixed_small"`` or ``"learned_range"``
            (the model's); ``None`` in continuous time.
        decoder_variance: discrete time: the decoder's (step 1) variance, one of :data:`DECODER_VARIANCES`.
        clip_denoised: clip the predicted ``x_0`` to [-1, 1] before forming the reverse mean (changes the model).
        cdf: the normal CDF of the discretised decoder, ``"exact"`` or ``"tanh"`` (the published approximation
            ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``).
        clean_end: how the data end is scored, one of :data:`CLEAN_ENDS`.
        levels: number of data levels (256 for 8-bit images).
        bin_width: width of one level on the [-1, 1] scale (``2/255`` or ``2/256``).
        grid: where level ``k`` sits on [-1, 1] (a formula, for the record).
        bits_offset: constant added to ``NLL / (d ln 2)`` to give the published bits/dim: ``0`` when the clean
            end is a probability (decoder), ``-log2(bin_width)`` for a dequantised density.
        lam_range: ``(lam_min, lam_max)`` log-SNR range, or ``None`` for the model's own (else [-20, 20]).
        prior_at: log-SNR where the prior ``N(0, I)`` sits (``None``: at ``lam_min``; discrete time: at step T).
        description: one line for tables.
        reference: the paper and the code file the settings were read from.
    """

    name: str
    time: str
    estimator: str
    variance: str | None
    decoder_variance: str | None
    clip_denoised: bool
    cdf: str
    clean_end: str
    levels: int
    bin_width: float
    grid: str
    bits_offset: float
    lam_range: tuple[float, float] | None
    prior_at: float | None
    description: str
    reference: str

    def __post_init__(self):
        if self.time not in TIMES:
            raise ValueError(f"Convention.time must be one of {TIMES}, got {self.time!r}")
        if self.cdf not in CDFS:
            raise ValueError(f"Convention.cdf must be one of {CDFS}, got {self.cdf!r}")
        if self.clean_end not in CLEAN_ENDS:
            raise ValueError(f"Convention.clean_end must be one of {CLEAN_ENDS}, got {self.clean_end!r}")
        if self.decoder_variance is not None and self.decoder_variance not in DECODER_VARIANCES:
            raise ValueError(
                f"Convention.decoder_variance must be one of {DECODER_VARIANCES}, got {self.decoder_variance!r}"
            )
        if self.levels < 2 or not self.bin_width > 0:
            raise ValueError(f"Convention needs levels >= 2 and bin_width > 0, got {self.levels}, {self.bin_width}")
        if self.lam_range is not None:
            lo, hi = (float(v) for v in self.lam_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"Convention.lam_range must be finite with lam_max > lam_min, got {self.lam_range}")
            object.__setattr__(self, "lam_range", (lo, hi))

    @property
    def dequantization_offset(self) -> float:
        """``-log2(bin_width)``: bits/dim added to a dequantised density on this grid (6.994 for 2/255, 7 for
        2/256)."""
        return -math.log2(self.bin_width)

    def replace(self, **changes) -> Convention:
        """A copy with some choices changed (e.g. ``get_convention("improved-diffusion").replace(cdf="tanh")``);
        the name gets a ``+`` suffix listing what changed unless ``name`` is given."""
        if "name" not in changes and changes:
            changes["name"] = self.name + "+" + ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
        return dataclasses.replace(self, **changes)

    def bits_per_dim(self, nll_nats: torch.Tensor | float, dim: int) -> torch.Tensor | float:
        """Published bits/dim of a per-example NLL in nats: ``nll / (d ln 2) + bits_offset``."""
        return nll_nats / (dim * math.log(2)) + self.bits_offset

    def as_dict(self) -> dict:
        """Every choice, JSON-serialisable (``lam_range`` as a list)."""
        out = dataclasses.asdict(self)
        out["lam_range"] = None if self.lam_range is None else list(self.lam_range)
        out["dequantization_offset"] = self.dequantization_offset
        return out


def _score_sde_range() -> tuple[float, float]:
    clock = VPLinearClock(0.1, 20.0)
    s = torch.tensor([1.0, 1e-5], dtype=torch.float64)
    lam = clock.logsnr(s)
    return float(lam[0]), float(lam[1])


_GRID_255 = "x = 2k/255 - 1 (bins x ± 1/255, outer bins open)"
_GRID_256_CENTRED = "x = 2(k + 1/2)/256 - 1"

CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            name="scoredensity",
            time="continuous",
            estimator="formula",
            variance="fixed_large",
            decoder_variance="model",
            clip_denoised=False,
            cdf="exact",
            clean_end="discretized",
            levels=256,
            bin_width=2 / 255,
            grid="x = 2k/(L-1) - 1 (bins x ± 1/(L-1), outer bins open)",
            bits_offset=0.0,
            lam_range=None,
            prior_at=None,
            description="this library: density formula on the model's log-SNR range, exact discretised decoder",
            reference="docs/design.md §2-§3",
        ),
        Convention(
            name="ddpm",
            time="discrete",
            estimator="ddpm_elbo",
            variance="fixed_large",
            decoder_variance="posterior",
            clip_denoised=True,
            cdf="exact",
            clean_end="discretized",
            levels=256,
            bin_width=2 / 255,
            grid=_GRID_255,
            bits_offset=0.0,
            lam_range=None,
            prior_at=None,
            description="Ho et al. 2020: T-step bound, fixedlarge with decoder variance sigma~_2^2, clipped x0",
            reference="Ho, Jain & Abbeel 2020; diffusion_tf/diffusion_utils_2.py (calc_bpd_loop, _vb_terms_bpd)",
        ),
        Convention(
            name="improved-diffusion",
            time="discrete",
            estimator="ddpm_elbo",
            variance="fixed_large",
            decoder_variance="posterior",
            clip_denoised=True,
            cdf="exact",
            clean_end="discretized",
            levels=256,
            bin_width=2 / 255,
            grid=_GRID_255,
            bits_offset=0.0,
            lam_range=None,
            prior_at=None,
            description="Nichol & Dhariwal 2021: calc_bpd_loop with clip_denoised=True (image_nll.py)",
            reference="Nichol & Dhariwal 2021; improved_diffusion/gaussian_diffusion.py, scripts/image_nll.py",
        ),
        Convention(
            name="score-sde",
            time="continuous",
            estimator="ode",
            variance=None,
            decoder_variance=None,
            clip_denoised=False,
            cdf="exact",
            clean_end="dequantized",
            levels=256,
            bin_width=2 / 256,
            grid="x = 2(k + u)/256 - 1, u ~ U[0, 1) (uniform dequantisation)",
            bits_offset=7.0,
            lam_range=_score_sde_range(),
            prior_at=_score_sde_range()[0],
            description="Song et al. 2021: probability-flow ODE on VP s in [1e-5, 1], prior at s = 1, +7 bits",
            reference="Song et al. 2021; score_sde_pytorch likelihood.py, sde_lib.py (VPSDE 0.1..20)",
        ),
        Convention(
            name="vdm",
            time="continuous",
            estimator="formula",
            variance=None,
            decoder_variance=None,
            clip_denoised=False,
            cdf="exact",
            clean_end="categorical",
            levels=256,
            bin_width=2 / 256,
            grid=_GRID_256_CENTRED,
            bits_offset=0.0,
            lam_range=(-5.0, 13.3),
            prior_at=-5.0,
            description="Kingma et al. 2021: continuous ELBO on log-SNR [-5, 13.3], categorical Gaussian decoder",
            reference="Kingma, Salimans, Poole & Ho 2021; google-research/vdm model_vdm.py, configs/cifar10.py",
        ),
    )
}
"""The named conventions (module docstring)."""


def get_convention(name: str | Convention) -> Convention:
    """The :class:`Convention` called ``name`` (a :class:`Convention` is returned unchanged).

    Raises:
        ValueError: naming the known conventions.
    """
    if isinstance(name, Convention):
        return name
    if name not in CONVENTIONS:
        raise ValueError(f"unknown convention {name!r}; known: {tuple(CONVENTIONS)}")
    return CONVENTIONS[name]
