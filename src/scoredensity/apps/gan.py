"""Score-matching regularisation of GANs with the density formula (Li & Yan 2024, §4.2; docs/design.md §4).

A fixed data denoiser ``eps`` (exact for the analytic mixtures, or a trained one) turns the cross-entropy of the
generator's samples into a regulariser,

    R(G) = -E_w log p_data(G(w))
         = -E_w [ noisy_end(x) + clean_end + ∫ 1/2 E_z ( sigmoid(lam) ||z||^2 - ||z - eps(x_lam, lam)||^2 ) dlam ],

with ``x = G(w)``, ``x_lam = sqrt(sigmoid(lam)) x + sqrt(sigmoid(-lam)) z`` and the end terms of
:func:`scoredensity.formula.end_terms`. One log-SNR ``lam ~ q`` and one ``z`` per sample give an unbiased
estimate of ``-log p_data(x)``; its pathwise gradient in ``x`` is

* ``gradient="full"``: ``sigmoid(lam_min) x - (w/q) sqrt(sigmoid(lam)) J_eps^T (z - eps)``, through the
  denoiser's Jacobian: unbiased for ``-grad log p_data(x)`` (tested against autograd of the exact mixture);
* ``gradient="sds"`` (the score-distillation shortcut, Poole et al. 2022): ``J_eps`` replaced by ``I``, i.e. the
  weighted denoising residual ``(w/q) sqrt(sigmoid(lam)) (eps - z)``. For the exact denoiser its mean is
  ``-grad_x ∫ w(lam) sqrt(t) E_z log p_t(x_lam) dlam`` -- the gradient of a *smoothed* cross-entropy, not of
  ``-log p_data``: cheaper (no backward pass through the denoiser) and biased.

Weights over noise levels: ``weighting="formula"`` is the formula's, uniform in log-SNR (``1/(t(1-t))`` in
``t``); ``"t_uniform"`` is what score-distillation methods use, uniform in ``t`` (weight ``t(1-t)`` per unit of
log-SNR), scaled to the same total mass on ``[lam_min, lam_max]``. Only ``formula`` + ``full`` estimates (and
differentiates) ``-log p_data`` itself.

The GAN side is deliberately plain: MLP generator and discriminator, non-saturating or hinge loss, Adam, on the
``ring8`` and ``grid25`` mixtures where mode collapse is measured (:func:`gan_metrics`: modes covered and
high-quality fraction as in Srivastava et al. 2017 / Lin et al. 2018, the exact cross-entropy, and a kernel
two-sample distance, since the regulariser alone rewards collapsing onto modes).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..decoders import end_terms
from ..epsfn import EpsFn, call_eps, check_data, check_int, resolve_lam_range, row_blocks, work_device
from ..formula import formula_integrand
from ..losses import LamSampler
from ..mixtures import GaussianMixture
from ..rng import Stream

__all__ = [
    "score_regulariser",
    "regulariser_gradient",
    "gan_metrics",
    "mmd2",
    "GANConfig",
    "GANResult",
    "train_gan",
    "MLP",
    "GRADIENTS",
    "REG_WEIGHTINGS",
    "GAN_LOSSES",
]

GRADIENTS = ("full", "sds")
REG_WEIGHTINGS = ("formula", "t_uniform")
GAN_LOSSES = ("ns", "hinge")


# -------------------------------------------------------------------------------------------- regulariser
def _lam_weight(u: Tensor, weighting: str, lam_min: float, lam_max: float) -> tuple[Tensor, Tensor]:
    """Log-SNR [n] from uniforms ``u`` [n] and the weight ``w(lam) / q(lam)`` [n] (float64, on ``u``'s device)."""
    width = lam_max - lam_min
    wq = torch.full_like(u, width)
    if weighting == "formula":  # q uniform in lam, w = 1
        return lam_min + width * u, wq
    # t uniform on [t_lo, t_hi] (the trainer's "t_uniform" draw); w(lam) = c t (1 - t) with ∫ w dlam = width, so
    # w / q = width
    lam, _ = LamSampler("t_uniform", lam_min, lam_max).sample(u)
    return lam, wq


def _key_from(generator: torch.Generator | None) -> int:
    """A fresh 63-bit key of the keyed draws, taken from ``generator`` (default torch's global generator)."""
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))


def _check_options(gradient: str, weighting: str) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if weighting not in REG_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {REG_WEIGHTINGS}, got {weighting!r}")


def _regulariser_from_draws(
    eps_fn: EpsFn,
    x: Tensor,
    u: Tensor,
    z: Tensor,
    gradient: str,
    weighting: str,
    lam_min: float,
    lam_max: float,
    precision: str,
) -> Tensor:
    """:func:`score_regulariser` at given draws: ``u`` [B] uniforms of the log-SNR, ``z`` [B, d] noise (float64,
    on ``work_device(x)``: ``x``'s device, the CPU for MPS). The network gets ``x_t`` on ``x``'s device and in its
    dtype; the rest is float64 on the work device. Returns [B] float64 there, with the chosen gradient."""
    dev = u.device
    lam, wq = _lam_weight(u, weighting, lam_min, lam_max)
    x64 = x.to(device=dev, dtype=torch.float64)
    a = torch.sigmoid(lam).sqrt()[:, None]
    t = torch.sigmoid(-lam)
    noisy, clean = end_terms(x64, lam_min, lam_max)  # noisy_end has a graph to x
    x_t = a * x64 + t.sqrt()[:, None] * z
    if gradient == "full":
        eps = call_eps(eps_fn, x_t.to(device=x.device, dtype=x.dtype), t, precision=precision).to(dev)
        return -(noisy + clean + wq * formula_integrand(z, eps, lam, True))
    with torch.no_grad():
        eps = call_eps(eps_fn, x_t.detach().to(device=x.device, dtype=x.dtype), t, precision=precision)
        eps = eps.to(device=dev, dtype=torch.float64)
        value = -(noisy + clean + wq * formula_integrand(z, eps, lam, True))
    # surrogate with gradient sigmoid(lam_min) x + (w/q) a (eps - z), value equal to the estimate
    sur = -noisy + wq * (a * (eps - z) * x64).sum(1)
    return value + (sur - sur.detach())


def _draws(seed: int, keys: Tensor, n_z: int, d: int, step: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Keyed draws of the regulariser: uniforms [B, n_z] (:attr:`Stream.GAN_LAM`) and normals [B, n_z, d]
    (:attr:`Stream.GAN_NOISE`); draw ``r`` of example ``keys[b]`` does not depend on ``n_z`` or the batch."""
    u = rng.uniforms(seed, Stream.GAN_LAM, keys, n_z, step=step, device=device)
    z = rng.normals(seed, Stream.GAN_NOISE, keys, (n_z, d), step=step, device=device)
    return u, z


def score_regulariser(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    gradient: str = "full",
    weighting: str = "formula",
    lam_min: float | None = None,
    lam_max: float | None = None,
    seed: int | None = None,
    step: int = 0,
    example_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    precision: str = "fp32",
) -> Tensor:
    """One-draw estimate of ``-log p_data(x)`` per sample, differentiable in ``x`` (see the module docstring).

    Args:
        eps_fn: the fixed data denoiser ``(x_t [B, d], t [B] float64) -> eps``; must be differentiable in
            ``x_t`` for ``gradient="full"``. Its parameters are not updated here.
        x: [B, d] generated samples (``G(w)``, with a graph to the generator), on the denoiser's device; the
            draws are made there.
        gradient: ``"full"`` (through the denoiser's Jacobian) or ``"sds"`` (Jacobian dropped).
        weighting: ``"formula"`` (uniform in log-SNR) or ``"t_uniform"`` (score-distillation's).
        lam_min, lam_max: log-SNR range closed by the exact end terms; ``None``: the denoiser's own
            ``lam_range``, else [-20, 20] (:func:`scoredensity.epsfn.resolve_lam_range`).
        seed, step, example_ids: key of the draws of ``lam`` and ``z`` (:mod:`scoredensity.rng`, streams
            ``GAN_LAM`` / ``GAN_NOISE``): sample ``b`` uses key ``(seed, step, example_ids[b])`` (default ids
            ``0..B-1``), the same on every device and in any batch; it is draw 0 of :func:`regulariser_gradient`.
        generator: when ``seed`` is None, a fresh key is taken from this generator (default torch's global
            generator), so repeated calls draw afresh.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the denoiser call only.

    Returns:
        [B] float64 on ``x``'s device (the CPU for MPS). Its value is the weighted objective's one-draw estimate
        (``-log p_data(x)`` for ``weighting="formula"``); its gradient in ``x`` is the chosen estimator. Mean it
        and add ``coef *`` that to the generator loss.
    """
    _check_options(gradient, weighting)
    lam_min, lam_max = resolve_lam_range(eps_fn, lam_min, lam_max)
    check_data(x.detach(), "generated samples x")
    if x.dim() != 2:
        raise ValueError(f"x must be [B, d], got {tuple(x.shape)}")
    b, d = x.shape
    dev = work_device(x)
    seed = _key_from(generator) if seed is None else int(seed)
    keys = rng.example_keys(example_ids, b, dev)
    u, z = _draws(seed, keys, 1, d, step, dev)
    return _regulariser_from_draws(eps_fn, x, u[:, 0], z[:, 0], gradient, weighting, lam_min, lam_max, precision)


def regulariser_gradient(
    eps_fn: EpsFn,
    x: Tensor,
    *,
    n_z: int = 256,
    max_batch: int | None = None,
    seed: int = 0,
    example_ids: Tensor | None = None,
    gradient: str = "full",
    weighting: str = "formula",
    lam_min: float | None = None,
    lam_max: float | None = None,
    precision: str = "fp32",
    n_draws: int | None = None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Monte Carlo mean and standard error of :func:`score_regulariser` and of its gradient at fixed points.

    Args:
        eps_fn, gradient, weighting, lam_min, lam_max, precision: as in :func:`score_regulariser`.
        x: [B, d] points (no graph needed), on the denoiser's device and in its input dtype.
        n_z: independent draws of ``(lam, z)`` per point. max_batch: rows per network call (default 8192; each
            call keeps its graph through the denoiser until its gradient is taken); the results do not depend
            on it. seed, example_ids: key of the draws (draw ``r`` of point ``b`` is keyed by
            ``(seed, example_ids[b])`` and ``r``, whatever ``max_batch``).
        n_draws, chunk: deprecated aliases of ``n_z`` and ``max_batch`` (DeprecationWarning).

    Returns:
        ``(value [B], value_stderr [B], grad [B, d], grad_stderr [B, d])`` float64 on the CPU: estimates of
        ``-log p_data(x)`` and ``-grad log p_data(x)`` (for ``formula`` + ``full``).
    """
    if n_draws is not None:
        warnings.warn("n_draws is deprecated; use n_z (draws of (lam, z) per point)", DeprecationWarning, 2)
        n_z = n_draws
    if chunk is not None:
        warnings.warn("chunk is deprecated; use max_batch (rows per network call)", DeprecationWarning, 2)
        max_batch = chunk if max_batch is None else max_batch
    max_batch = check_int("max_batch", 8192 if max_batch is None else max_batch)
    n_z = check_int("n_z", n_z, 2)
    _check_options(gradient, weighting)
    lam_min, lam_max = resolve_lam_range(eps_fn, lam_min, lam_max)
    x = check_data(x.detach(), "x")
    if x.dim() != 2:
        raise ValueError(f"x must be [B, d], got {tuple(x.shape)}")
    b, d = x.shape
    dev = work_device(x)
    keys = rng.example_keys(example_ids, b, dev)
    u, z = _draws(int(seed), keys, n_z, d, 0, dev)
    u_rows = u.T.reshape(-1)  # draw-major: row r*b + i is draw r of point i
    z_rows = z.transpose(0, 1).reshape(-1, d)
    rows = x.repeat(n_z, 1)
    vals, grads = [], []
    for sl in row_blocks(rows.shape[0], max_batch):
        xr = rows[sl].clone().requires_grad_(True)
        v = _regulariser_from_draws(
            eps_fn, xr, u_rows[sl], z_rows[sl], gradient, weighting, lam_min, lam_max, precision
        )
        (gr,) = torch.autograd.grad(v.sum(), xr)
        vals.append(v.detach())
        grads.append(gr.detach().to(torch.float64))
    v = torch.cat(vals).reshape(n_z, b)
    gr = torch.cat(grads).reshape(n_z, b, d)
    sq = math.sqrt(n_z)
    return tuple(r.cpu() for r in (v.mean(0), v.std(0) / sq, gr.mean(0), gr.std(0) / sq))


# -------------------------------------------------------------------------------------------- metrics
def mmd2(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased squared maximum mean discrepancy (Gretton et al. 2012) with a sum of Gaussian kernels.

    Args:
        x: [N, d], y: [M, d] samples (N, M >= 2). bandwidths: kernel widths; default the median pairwise
            distance of ``y`` times (1/8, 1/2, 2).

    Returns:
        MMD^2 estimate (can be slightly negative when the laws agree).
    """
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("mmd2 needs at least two samples on each side")
    if bandwidths is None:
        med = float(torch.pdist(y[:2000]).median())
        bandwidths = (med / 8, med / 2, med * 2)
    n, m = x.shape[0], y.shape[0]
    dxx, dyy, dxy = torch.cdist(x, x).pow(2), torch.cdist(y, y).pow(2), torch.cdist(x, y).pow(2)
    total = 0.0
    for h in bandwidths:
        kxx, kyy, kxy = (torch.exp(-dd / (2 * h * h)) for dd in (dxx, dyy, dxy))
        total += float(
            (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return total


def gan_metrics(
    samples: Tensor,
    mixture: GaussianMixture,
    *,
    real: Tensor | None = None,
    n_std: float = 3.0,
    min_count: int = 1,
) -> dict[str, float]:
    """Mode-collapse metrics of generated 2-D (or any-d) samples against a Gaussian mixture.

    * ``modes_covered``: modes with at least ``min_count`` high-quality samples (VEEGAN / PacGAN use 1 with
      2,500 samples on the grid and ring benchmarks);
    * ``high_quality``: fraction of samples within ``n_std`` standard deviations of their nearest mode mean
      (the component's std is the root mean eigenvalue of its covariance);
    * ``mode_kl``: KL divergence from the mode histogram of the high-quality samples to the mixture weights
      (PacGAN's reverse-KL measure; ``inf`` when no sample is high quality);
    * ``cross_entropy``: the exact ``-mean log p_data(samples)`` in nats;
    * ``mmd2``: :func:`mmd2` to ``real`` samples (drawn from the mixture with a fixed key when ``None``).

    Args:
        samples: [N, d]. mixture: the data law. real: [M, d] reference samples.

    Returns:
        dict of floats.
    """
    x = check_data(samples.detach().to(torch.float64), "samples")
    if x.shape[1] != mixture.dim:
        raise ValueError(f"samples have dimension {x.shape[1]}, the mixture {mixture.dim}")
    dist = torch.cdist(x, mixture.means)  # [N, K]
    near = dist.argmin(1)
    std = mixture.evals.mean(1).sqrt()  # [K]
    hq = dist.gather(1, near[:, None])[:, 0] <= n_std * std[near]
    counts = torch.bincount(near[hq], minlength=mixture.num_components).to(torch.float64)
    if hq.any():
        p = counts / counts.sum()
        nz = p > 0
        mode_kl = float((p[nz] * (p[nz] / mixture.weights[nz]).log()).sum())
    else:
        mode_kl = float("inf")
    if real is None:
        real = _real_batch(mixture.to(x.device), 12345, 0, x.shape[0])
    return {
        "modes_covered": float((counts >= min_count).sum()),
        "high_quality": float(hq.to(torch.float64).mean()),
        "mode_kl": mode_kl,
        "cross_entropy": float(-mixture.log_prob(x).mean()),
        "mmd2": mmd2(x, real),
    }


# -------------------------------------------------------------------------------------------- the GAN
class MLP(nn.Module):
    """``in_dim -> [Linear, LeakyReLU(0.2)] x depth -> out_dim``: the generator and discriminator of the 2-D
    mode-collapse benchmarks (Metz et al. 2017 use ReLU MLPs of this size)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.LeakyReLU(0.2)]
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class GANConfig:
    """Settings of :func:`train_gan` (JSON-serialisable).

    Attributes:
        preset: mixture preset of the data (``ring8``, ``grid25``, ...). steps: generator updates.
        batch: samples per step. latent_dim: generator input. hidden, depth: MLP size (both nets).
        lr: Adam learning rate (betas 0.5, 0.9) for both. loss: ``"ns"`` (non-saturating) or ``"hinge"``.
        reg_coef: coefficient of the score regulariser (0 = plain GAN). reg_gradient, reg_weighting,
        reg_lam_min, reg_lam_max: see :func:`score_regulariser`. seed: everything random (the networks'
        initialisation, and every draw through :mod:`scoredensity.rng` keyed by the step). device: where both
        networks, the data and the regulariser compute (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``).
    """

    preset: str = "ring8"
    steps: int = 2000
    batch: int = 256
    latent_dim: int = 2
    hidden: int = 128
    depth: int = 3
    lr: float = 2e-4
    loss: str = "ns"
    reg_coef: float = 0.0
    reg_gradient: str = "full"
    reg_weighting: str = "formula"
    reg_lam_min: float = -20.0
    reg_lam_max: float = 20.0
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.loss not in GAN_LOSSES:
            raise ValueError(f"loss must be one of {GAN_LOSSES}, got {self.loss!r}")
        if self.reg_gradient not in GRADIENTS:
            raise ValueError(f"reg_gradient must be one of {GRADIENTS}, got {self.reg_gradient!r}")
        if self.reg_weighting not in REG_WEIGHTINGS:
            raise ValueError(f"reg_weighting must be one of {REG_WEIGHTINGS}, got {self.reg_weighting!r}")
        for name in ("steps", "batch", "latent_dim", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.reg_coef >= 0):
            raise ValueError("lr must be > 0 and reg_coef >= 0")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must name a torch device (cpu, cuda, cuda:N, mps), got {self.device!r}") from None


@dataclass
class GANResult:
    """A trained generator and its training record.

    Attributes:
        generator: the MLP ``w [N, latent_dim] -> x [N, d]``. config: the settings. history: per logging
        step ``{"step", "d_loss", "g_loss", "reg"}``. seconds: wall time of training.
    """

    generator: nn.Module
    config: GANConfig
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` generated points [n, d] (float32, on the CPU) from latents keyed by ``seed``
        (:attr:`~scoredensity.rng.Stream.GAN_LATENT`, computed on the generator's device)."""
        n = check_int("n", n)
        dev = next(self.generator.parameters()).device
        w = _latents(int(seed), 0, n, self.config.latent_dim, dev)
        return self.generator(w).cpu()


def _latents(seed: int, step: int, n: int, latent_dim: int, device: torch.device) -> Tensor:
    """Generator inputs [n, latent_dim] float32 keyed by ``(seed, step, row)`` on ``device``."""
    keys = rng.example_keys(None, n, device)
    return rng.normals(seed, Stream.GAN_LATENT, keys, (latent_dim,), step=step, device=device).to(device).float()


def _real_batch(mix: GaussianMixture, seed: int, step: int, n: int) -> Tensor:
    """``n`` samples [n, d] float64 of the mixture keyed by ``(seed, step, row)``, on the mixture's device:
    component by inverse CDF of a keyed uniform, then ``mean + U diag(sqrt(s)) z``."""
    dev = mix.device
    keys = rng.example_keys(None, n, dev)
    u = rng.uniforms(seed, Stream.GAN_DATA, keys, 1, step=step, device=dev)[:, 0].to(dev)
    cdf = torch.cumsum(mix.weights, 0)
    labels = torch.searchsorted(cdf, u.contiguous()).clamp(max=mix.num_components - 1)
    z = rng.normals(seed, Stream.GAN_DATA_NOISE, keys, (mix.dim,), step=step, device=dev).to(dev)
    root = mix.evecs * mix.evals.sqrt()[:, None, :]  # U diag(sqrt s), [K, d, d]
    return mix.means[labels] + torch.einsum("nij,nj->ni", root[labels], z)


def train_gan(
    config: GANConfig | None = None, eps_fn: EpsFn | None = None, log_every: int = 100, **overrides
) -> GANResult:
    """Train a (score-regularised) GAN on samples of a mixture preset.

    Generator loss: the adversarial loss plus ``reg_coef * mean score_regulariser(eps_fn, G(w))``.

    Args:
        config: settings; ``overrides`` replace fields (``train_gan(preset="grid25", reg_coef=0.01)``).
        eps_fn: the data denoiser for the regulariser; default the preset's exact ``eps``.
        log_every: steps between history records.

    Returns:
        :class:`GANResult`.
    """
    from ..mixtures import mixture_preset

    cfg = GANConfig(**{**asdict(config or GANConfig()), **overrides})
    cfg.validate()
    dev = torch.device(cfg.device)
    mix = mixture_preset(cfg.preset).to(dev)
    eps_fn = eps_fn if eps_fn is not None else mix.eps
    torch.manual_seed(cfg.seed)  # the networks' initialisation; every later draw is keyed (scoredensity.rng)
    G = MLP(cfg.latent_dim, mix.dim, cfg.hidden, cfg.depth).to(dev)
    D = MLP(mix.dim, 1, cfg.hidden, cfg.depth).to(dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    history = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        real = _real_batch(mix, cfg.seed, step, cfg.batch).float()
        fake = G(_latents(cfg.seed, step, cfg.batch, cfg.latent_dim, dev))
        d_real, d_fake = D(real), D(fake.detach())
        if cfg.loss == "ns":
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        else:
            d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()

        d_gen = D(fake)
        g_loss = F.softplus(-d_gen).mean() if cfg.loss == "ns" else -d_gen.mean()
        reg = torch.zeros((), device=dev)
        if cfg.reg_coef > 0:
            reg = score_regulariser(
                eps_fn,
                fake,
                gradient=cfg.reg_gradient,
                weighting=cfg.reg_weighting,
                lam_min=cfg.reg_lam_min,
                lam_max=cfg.reg_lam_max,
                seed=cfg.seed,
                step=step,
            ).mean()
        total = g_loss + cfg.reg_coef * reg.to(g_loss.dtype)
        opt_g.zero_grad()
        total.backward()
        opt_g.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append(
                dict(step=step, d_loss=float(d_loss.detach()), g_loss=float(g_loss.detach()), reg=float(reg.detach()))
            )
    return GANResult(generator=G.eval(), config=cfg, history=history, seconds=time.perf_counter() - t0)
