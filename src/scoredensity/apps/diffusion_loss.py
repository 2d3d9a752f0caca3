"""The diffusion loss: a small denoising head for autoregressive models over continuous tokens (DESIGN.md §4).

An autoregressive backbone (any network) turns the past into a vector ``c``; instead of a Gaussian or a
mixture-density output layer, a small MLP denoiser ``eps(x_t, t | c)`` models ``p(x | c)`` for the next token
``x`` in R^D, without vector quantisation (Li et al. 2024, "Autoregressive image generation without vector
quantization", the MAR recipe). Everything here is in canonical time ``x_t = sqrt(1-t) x + sqrt(t) z``.

* **Head** (:class:`DiffusionLoss`): residual MLP blocks with adaptive layer norm on ``y = emb(lam) + W c``
  (shift, scale and a zero-initialised gate per block, as in DiT/MAR), EDM input scaling and the
  v-parameterisation ``eps = sqrt(t) x_t + sqrt(1-t) c_out F`` (DESIGN.md §1: right limit at ``t -> 1``).
* **Loss** (``forward``): ``weighting="elbo"`` is minus the density formula's one-sample bound in nats per
  token (log-SNR uniform on ``[lam_min, lam_max]``, the same end terms as :func:`scoredensity.formula.log_density`),
  so its minimiser maximises the likelihood; ``"simple"`` is DDPM's ``L_simple`` (``t`` uniform). As in MAR,
  each token is noised ``t_per_token`` times per step (the head is cheap next to the backbone).
* **log p(x | c)** (``log_prob``): :func:`scoredensity.formula.log_density` on the head with ``c`` bound, in nats
  with a standard error: a lower bound (in expectation) for a learned head, so an autoregressive model built
  on it reports a certified NLL.
* **Sampling** (``sample``): DDPM ancestral steps on a cosine grid, the noise of each reverse step multiplied
  by the temperature ``tau`` (MAR's recipe). Step noise ``variance="tweedie"`` (default) adds the uncertainty of
  ``x0_hat`` from the denoiser's Jacobian, so each step is exact for a Gaussian target; ``"posterior"`` is
  DDPM/MAR's ``fixed_small`` variance, which loses variance on coarse grids (see :func:`ancestral_sample`).

**What the temperature does.** Scaling the reverse-step noise does *not* sample ``p^(1/tau)``. For a Gaussian
target ``N(mu, S)`` and the exact denoiser every quantity is linear, and the moments obey (per eigen-direction
of ``S`` with variance ``v``; ``m(t) = (1-t) v + t`` is the true marginal variance)

* mean: ``E x`` is unchanged by ``tau`` (the posterior mean is consistent: ``A_k a_t + B_k = a_s``);
* variance, one ancestral step ``t -> s``: ``V_s = (A + B kappa_t)^2 V_t + tau^2 (P [+ B^2 v t / m(t)])``, with
  ``A, B, P`` the DDPM posterior coefficients, ``kappa_t = a_t v / m(t)`` the denoiser's gain and the bracket
  for the Tweedie step (:func:`gaussian_temperature_law` iterates this exactly for any grid);
* continuous-time limit (the reverse SDE ``dx = [f - g^2 s] dt + tau g dW``): ``dV/dt = a(t) V - tau^2/(1-t)``
  with ``a = (2 - m) / ((1-t) m)``, whose only solution that stays finite at ``t = 1`` is ``V(t) = tau^2 m(t)``.

(the general solution adds ``C m^2 / (1-t)``, and any finite start near ``t = 1`` forces ``C -> 0``). So the
sampler gives ``N(mu, tau^2 S)``: the standard deviation scales by ``tau``, which for a Gaussian is
``p^(1/tau^2)`` (not ``p^(1/tau)``, whose variance is ``tau S``). With Tweedie steps ``V = tau^2 m`` is preserved
by every step, so this holds exactly at any step count; with posterior steps only as the grid is refined (at
100 cosine steps and ``tau = 1`` the variance is already 5-23% short for ``v`` from 1 down to 0.01). For
non-Gaussian targets there is no closed form: low temperatures shrink each mode (and, through the drift, move
mass between modes in a path-dependent way).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..epsfn import EpsFn, call_eps, check_data
from ..formula import end_terms, formula_integrand, log_density
from ..logdensity import LogDensity

__all__ = [
    "DiffusionLoss",
    "ancestral_sample",
    "cosine_lam_grid",
    "gaussian_temperature_law",
    "CausalTransformerAR",
    "BimodalARProcess",
    "WEIGHTINGS",
]

WEIGHTINGS = ("elbo", "simple")
_LAM_EMB_SCALE = 8.0


# ----------------------------------------------------------------------------------------------- sampler
def cosine_lam_grid(steps: int, lam_min: float = -20.0, lam_max: float = 20.0) -> Tensor:
    """Decreasing-noise grid of ``steps + 1`` log-SNRs from ``lam_min`` to ``lam_max`` (float64).

    Uniform in ``u`` for the cosine clock ``t = sin^2(pi u / 2)`` (``lam = -2 log tan(pi u / 2)``), cut to the
    range, so the steps are dense where the cosine schedule puts them (Nichol & Dhariwal 2021).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lam_max > lam_min:
        raise ValueError(f"need lam_max > lam_min, got [{lam_min}, {lam_max}]")
    u_hi = (2 / math.pi) * math.atan(math.exp(-lam_min / 2))
    u_lo = (2 / math.pi) * math.atan(math.exp(-lam_max / 2))
    u = torch.linspace(u_hi, u_lo, steps + 1, dtype=torch.float64)
    return -2 * torch.log(torch.tan(0.5 * math.pi * u))


def _step_coefficients(lam_t: Tensor, lam_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM posterior ``q(x_s | x_t, x0) = N(A x_t + B x0, P)`` for ``s < t`` given by log-SNRs (float64).

    With ``a^2 = 1 - t``: ``A = (a_t / a_s) s / t``, ``B = a_s (t - s) / ((1 - s) t)``, ``P = (t - s) s / ((1 - s) t)``.
    """
    t, s = torch.sigmoid(-lam_t), torch.sigmoid(-lam_s)
    a_t, a_s = torch.sigmoid(lam_t).sqrt(), torch.sigmoid(lam_s).sqrt()
    one_m_s = torch.sigmoid(lam_s)
    diff = t - s
    return (a_t / a_s) * s / t, a_s * diff / (one_m_s * t), diff * s / (one_m_s * t)


VARIANCES = ("posterior", "tweedie")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return float(temperature)


def _tweedie_cov(eps_fn: EpsFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``eps`` [N, D] and the posterior covariance ``Cov[x0 | x_t] = t/(1-t) (I - sqrt(t) dEps/dx_t)`` [N, D, D]
    (second-order Tweedie), with the Jacobian by D vector-Jacobian products, symmetrised, eigenvalues clamped >= 0."""
    with torch.enable_grad():
        xg = x.detach().to(torch.float64).requires_grad_(True)
        eps = call_eps(eps_fn, xg, t).to(torch.float64)
        d = x.shape[1]
        rows = [torch.autograd.grad(eps[:, i].sum(), xg, retain_graph=i < d - 1)[0] for i in range(d)]
    jac = torch.stack(rows, 1)  # [N, D_out, D_in]
    jac = 0.5 * (jac + jac.transpose(1, 2))
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    one_m_t = 1 - t
    cov = (t / one_m_t)[:, None, None] * (eye - t.sqrt()[:, None, None] * jac)
    evals, evecs = torch.linalg.eigh(cov)
    cov = (evecs * evals.clamp_min(0)[:, None, :]) @ evecs.transpose(1, 2)
    return eps.detach(), cov


def ancestral_sample(
    eps_fn: EpsFn,
    shape: tuple[int, ...],
    *,
    steps: int = 100,
    temperature: float = 1.0,
    variance: str = "posterior",
    lam_min: float = -20.0,
    lam_max: float = 20.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """DDPM ancestral sampling with temperature, in canonical time (seed 000 §4.4; MAR's sampler).

    Starts from ``N(0, I)`` at ``lam_min``, steps along :func:`cosine_lam_grid` with
    ``x_s = A x_t + B x0_hat + tau * noise`` and returns ``x0_hat`` at the last node (no noise there).

    ``variance="posterior"`` (DDPM's ``fixed_small``, MAR): noise ``N(0, P I)``, the posterior given ``x0``. It
    ignores the uncertainty of ``x0_hat``, so coarse grids lose variance (measured for a Gaussian with the exact
    denoiser: at 100 cosine steps 0.95 of the variance for unit variance, 0.77 for variance 0.01; see
    :func:`gaussian_temperature_law`). ``"tweedie"``: noise ``N(0, P I + B^2 Cov[x0 | x_t])`` with the posterior
    covariance from the denoiser's Jacobian (second-order Tweedie; D extra vector-Jacobian products per step,
    for flat tokens ``[N, D]``): every step is then the exact transition for a Gaussian target, at any step count.

    Args:
        eps_fn: ``(x_t [N, *shape], t [N] float64) -> eps``.
        shape: ``(N, *per-example shape)`` of the output.
        steps: grid intervals (model calls = steps + 1). temperature: ``tau > 0`` multiplying the reverse-step
            noise (see the module docstring for the law it gives). variance: as above.
        lam_min, lam_max: grid ends. generator: a CPU generator for reproducible noise (drawn on the CPU, so
            results do not depend on the device). device: where ``eps_fn`` runs (default CPU).

    Returns:
        [N, *shape] samples in ``dtype`` on ``device``.
    """
    tau = _check_temperature(temperature)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if variance == "tweedie" and len(shape) != 2:
        raise ValueError(f"variance='tweedie' needs flat tokens, shape (N, D); got {tuple(shape)}")
    grid = cosine_lam_grid(steps, lam_min, lam_max).to(device)
    n = shape[0]
    bshape = (n,) + (1,) * (len(shape) - 1)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    for k in range(steps):
        lam_t = grid[k].expand(n)
        t = torch.sigmoid(-lam_t)
        a, b, p = (v.reshape(bshape) for v in _step_coefficients(lam_t, grid[k + 1].expand(n)))
        noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
        if variance == "tweedie":
            eps, cov0 = _tweedie_cov(eps_fn, x, t)
            eye = torch.eye(shape[1], dtype=torch.float64, device=x.device)
            cov = p[:, :, None] * eye + b[:, :, None] ** 2 * cov0
            evals, evecs = torch.linalg.eigh(cov)
            noise = torch.einsum("nij,nj->ni", evecs * evals.clamp_min(0).sqrt()[:, None, :], noise)
        else:
            eps = call_eps(eps_fn, x.to(dtype), t).to(torch.float64)
            noise = p.sqrt() * noise
        x0 = (x - t.sqrt().reshape(bshape) * eps) / torch.sigmoid(lam_t).sqrt().reshape(bshape)
        x = a * x + b * x0 + tau * noise
    t = torch.sigmoid(-grid[-1]).expand(n)
    eps = call_eps(eps_fn, x.to(dtype), t).to(torch.float64)
    x0 = (x - t.sqrt().reshape(bshape) * eps) / torch.sigmoid(grid[-1]).sqrt()
    return x0.to(dtype)


def gaussian_temperature_law(
    mean: Tensor,
    cov: Tensor,
    temperature: float,
    *,
    steps: int = 100,
    variance: str = "posterior",
    lam_min: float = -20.0,
    lam_max: float = 20.0,
) -> tuple[Tensor, Tensor]:
    """Exact law of :func:`ancestral_sample` with the exact denoiser of ``N(mean, cov)`` (linear moment equations).

    Every step is linear in ``x_t`` and Gaussian, so the output is ``N(m_out, U diag(V_out) U^T)`` in the
    eigenbasis ``cov = U diag(v) U^T``, with ``V_s = (A + B kappa_t)^2 V_t + tau^2 (P + [B^2 v t / m(t)])``
    (the bracket for ``variance="tweedie"`` only) and the mean independent of ``tau``. As ``steps -> inf`` both
    variances tend to ``N(mean, temperature^2 cov)``; with ``"tweedie"`` and ``tau = 1`` the law is
    ``N(mean, cov)`` at any step count.

    Args:
        mean: [D]. cov: [D, D] symmetric positive definite. temperature: ``tau > 0``. The rest as in
            :func:`ancestral_sample`.

    Returns:
        ``(mean [D], cov [D, D])`` float64.
    """
    tau = _check_temperature(temperature)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    v, u = torch.linalg.eigh(cov)
    mu = u.T @ mean  # eigen-coordinates
    grid = cosine_lam_grid(steps, lam_min, lam_max)
    m = torch.zeros_like(mu)  # the sampler starts at N(0, I)
    var = torch.ones_like(v)

    def gain(lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = torch.sigmoid(lam).sqrt()
        marg = a**2 * v + torch.sigmoid(-lam)
        return a * v / marg, a, v * torch.sigmoid(-lam) / marg  # kappa, a_t, Var[x0 | x_t]

    for k in range(steps):
        kap, a_t, post = gain(grid[k])
        ca, cb, cp = _step_coefficients(grid[k], grid[k + 1])
        m = ca * m + cb * (mu + kap * (m - a_t * mu))
        noise_var = cp + (cb**2 * post if variance == "tweedie" else 0.0)
        var = (ca + cb * kap) ** 2 * var + tau**2 * noise_var
    kap, a_t, _ = gain(grid[-1])
    m = mu + kap * (m - a_t * mu)
    var = kap**2 * var
    return u @ m, (u * var) @ u.T


# ----------------------------------------------------------------------------------------------- the head
class _AdaLNBlock(nn.Module):
    """``h + gate * MLP(LN(h) * (1 + scale) + shift)``; (shift, scale, gate) from the condition, gate starts at 0."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class DiffusionLoss(nn.Module):
    """Denoising head modelling ``p(x | c)`` for tokens ``x`` in R^D given a backbone vector ``c`` in R^C.

    Args:
        token_dim: D. cond_dim: C. width: hidden width. depth: residual adaLN blocks.
        weighting: ``"elbo"`` (likelihood weighting; the loss is the negative bound in nats per token) or
            ``"simple"`` (DDPM's ``L_simple``: mean over dimensions of ``||z - eps||^2``, ``t`` uniform).
        t_per_token: noise levels drawn per token per call of ``forward`` (MAR uses 4).
        lam_min, lam_max: log-SNR range of the loss, of ``log_prob`` and of the sampler.
        data_std: typical token standard deviation, for the input scaling and output parameterisation.
        n_freq: Fourier frequencies of the log-SNR embedding.

    ``forward(x, c)`` -> loss; ``sample(c, steps, temperature, generator)``; ``log_prob(x, c)`` -> LogDensity.
    ``x`` is [..., D] and ``c`` [..., C] with the same leading dimensions.
    """

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int = 256,
        depth: int = 3,
        *,
        weighting: str = "elbo",
        t_per_token: int = 4,
        lam_min: float = -20.0,
        lam_max: float = 20.0,
        data_std: float = 1.0,
        n_freq: int = 16,
    ):
        super().__init__()
        if token_dim < 1 or cond_dim < 1 or width < 1 or depth < 0:
            raise ValueError("token_dim, cond_dim and width must be >= 1 and depth >= 0")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if t_per_token < 1:
            raise ValueError(f"t_per_token must be >= 1, got {t_per_token}")
        if not lam_max > lam_min:
            raise ValueError(f"need lam_max > lam_min, got [{lam_min}, {lam_max}]")
        if not data_std > 0:
            raise ValueError(f"data_std must be > 0, got {data_std}")
        self.token_dim = int(token_dim)
        self.cond_dim = int(cond_dim)
        self.weighting = weighting
        self.t_per_token = int(t_per_token)
        self.lam_min = float(lam_min)
        self.lam_max = float(lam_max)
        self.data_std = float(data_std)
        self.register_buffer("freqs", math.pi * torch.logspace(0, math.log10(64.0), n_freq), persistent=False)
        self.time_emb = nn.Sequential(nn.Linear(2 * n_freq + 1, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_emb = nn.Linear(cond_dim, width)
        self.inp = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList([_AdaLNBlock(width) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        for layer in (self.out_ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- checks
    def _check(self, x: Tensor | None, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """Flatten ``x`` [..., D] and ``c`` [..., C] to rows, checking widths, shapes and finiteness."""
        if not isinstance(c, Tensor) or c.dim() < 1 or c.shape[-1] != self.cond_dim:
            got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"condition c must have shape [..., {self.cond_dim}] (cond_dim), got {got}")
        c2 = check_data(c.reshape(-1, self.cond_dim), "condition c")
        if x is None:
            return None, c2
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.token_dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"tokens x must have shape [..., {self.token_dim}] (token_dim), got {got}")
        if x.shape[:-1] != c.shape[:-1]:
            raise ValueError(f"x {tuple(x.shape)} and c {tuple(c.shape)} must have the same leading dimensions")
        return check_data(x.reshape(-1, self.token_dim), "tokens x"), c2

    # -- the denoiser
    def eps(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """Noise prediction ``eps(x_t, t | c)``: x_t [N, D], t [N] (float64), c [N, C] -> [N, D] in x_t's dtype."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        lam = torch.log1p(-t) - torch.log(t)
        one_m_t, tt = torch.sigmoid(lam), torch.sigmoid(-lam)
        s2 = self.data_std**2
        c_in = torch.rsqrt(one_m_t * s2 + tt)[:, None]
        c_out = torch.sqrt(one_m_t + tt * s2)[:, None]
        u = (lam / _LAM_EMB_SCALE).clamp(-8.0, 8.0)[:, None]
        arg = u * self.freqs.to(torch.float64)[None]
        feats = torch.cat([u, arg.sin(), arg.cos()], 1).to(torch.float32)
        y = self.time_emb(feats) + self.cond_emb(c.to(torch.float32))
        h = self.inp((x_t.to(torch.float64) * c_in).to(torch.float32))
        for blk in self.blocks:
            h = blk(h, y)
        shift, scale = self.out_ada(y).chunk(2, dim=-1)
        f = self.out(self.out_norm(h) * (1 + scale) + shift).to(torch.float64)
        eps = tt.sqrt()[:, None] * x_t.to(torch.float64) + one_m_t.sqrt()[:, None] * c_out * f
        return eps.to(x_t.dtype)

    def eps_fn(self, c: Tensor) -> EpsFn:
        """The head as an :class:`~scoredensity.epsfn.EpsFn` with the condition bound.

        ``c`` is [C] (broadcast to every row) or [N, C] (row ``i`` of ``x_t`` uses ``c[i]``)."""
        c = c.reshape(-1, self.cond_dim)

        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            cc = c.expand(x_t.shape[0], -1) if c.shape[0] == 1 else c
            if cc.shape[0] != x_t.shape[0]:
                raise ValueError(f"bound condition has {cc.shape[0]} rows, x_t has {x_t.shape[0]}")
            return self.eps(x_t, t, cc)

        return fn

    # -- training loss
    def forward(
        self, x: Tensor, c: Tensor, mask: Tensor | None = None, reduction: str = "mean", generator=None
    ) -> Tensor:
        """Diffusion loss of tokens ``x`` [..., D] given ``c`` [..., C].

        Each token is noised ``t_per_token`` times. ``elbo``: log-SNR uniform on ``[lam_min, lam_max]`` and the
        loss ``-(noisy_end + clean_end + (lam_max - lam_min) * integrand)`` per draw (nats per token, an unbiased
        estimate of the negative bound that :meth:`log_prob` reports). ``simple``: ``t`` uniform on the same
        range and the mean over dimensions of ``||z - eps||^2``.

        Args:
            mask: optional [...] token weights (MAR's mask); the mean is then weighted.
            reduction: ``"mean"`` (scalar) or ``"none"`` (per token [...], averaged over the draws).
            generator: optional ``torch.Generator`` for the noise.

        Returns:
            Scalar loss, or per-token losses with the leading shape of ``x``.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        lead = x.shape[:-1] if isinstance(x, Tensor) else None
        x2, c2 = self._check(x, c)
        n, r = x2.shape[0], self.t_per_token
        xr = x2.repeat(r, 1).to(torch.float64)
        cr = c2.repeat(r, 1)
        dev = None if generator is None else generator.device  # draw where the generator lives, then move
        u = torch.rand(n * r, generator=generator, dtype=torch.float64, device=dev or x2.device).to(x2.device)
        z = torch.randn(n * r, self.token_dim, generator=generator, dtype=torch.float64, device=dev or x2.device)
        z = z.to(x2.device)
        if self.weighting == "elbo":
            lam = self.lam_min + (self.lam_max - self.lam_min) * u
        else:
            t_lo = torch.sigmoid(torch.tensor(-self.lam_max, dtype=torch.float64))
            t_hi = torch.sigmoid(torch.tensor(-self.lam_min, dtype=torch.float64))
            t = t_lo + (t_hi - t_lo) * u
            lam = torch.log1p(-t) - torch.log(t)
        t = torch.sigmoid(-lam)
        x_t = torch.sigmoid(lam).sqrt()[:, None] * xr + t.sqrt()[:, None] * z
        eps = self.eps(x_t.to(x2.dtype), t, cr)
        if self.weighting == "elbo":
            noisy, clean = end_terms(xr, self.lam_min, self.lam_max)
            per = -(noisy + clean + (self.lam_max - self.lam_min) * formula_integrand(z, eps, lam, True))
        else:
            per = (z - eps.to(torch.float64)).pow(2).mean(1)
        per = per.reshape(r, n).mean(0)  # [n]
        if reduction == "none":
            return per.reshape(lead).to(x2.dtype)
        if mask is None:
            return per.mean().to(x2.dtype)
        w = torch.as_tensor(mask, dtype=torch.float64, device=x2.device).reshape(-1)
        if w.shape[0] != n:
            raise ValueError(f"mask must have shape {tuple(lead)}, got {tuple(mask.shape)}")
        return ((per * w).sum() / w.sum().clamp_min(1e-12)).to(x2.dtype)

    # -- sampling
    @torch.no_grad()
    def sample(
        self,
        c: Tensor,
        steps: int = 100,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        variance: str = "tweedie",
    ) -> Tensor:
        """Draw one token per condition: ``c`` [..., C] -> [..., D] (float32), by :func:`ancestral_sample`.

        ``temperature`` multiplies the reverse-step noise: for a Gaussian ``p(x | c)`` the mean is unchanged and
        the covariance scales by ``temperature^2`` (exactly, at any step count, with the default
        ``variance="tweedie"``, whose steps are exact transitions for Gaussian targets; on a grid refined towards
        the continuum limit with MAR's ``"posterior"``; finite-step law: :func:`gaussian_temperature_law`)."""
        tau = _check_temperature(temperature)
        _, c2 = self._check(None, c)
        out = ancestral_sample(
            self.eps_fn(c2),
            (c2.shape[0], self.token_dim),
            steps=steps,
            temperature=tau,
            variance=variance,
            lam_min=self.lam_min,
            lam_max=self.lam_max,
            generator=generator,
            device=c2.device,
        )
        return out.reshape(*c.shape[:-1], self.token_dim)

    # -- likelihood
    @torch.no_grad()
    def log_prob(self, x: Tensor, c: Tensor, *, n_t: int = 64, seed: int = 0, **formula_kwargs) -> LogDensity:
        """``log p(x | c)`` per token by the density formula (:func:`scoredensity.formula.log_density`), in nats.

        One call of the estimator for all tokens: each token's ``c`` travels with its rows (``cond=``), and each
        token has its own random stream. For a learned head the value is, in expectation, a lower bound on the
        log-likelihood of the plug-in reverse SDE (seed 001).

        Args:
            x: [..., D] tokens. c: [..., C] conditions. n_t: log-SNR nodes per token. seed: randomness.
            formula_kwargs: passed to :func:`~scoredensity.formula.log_density` (``n_z``, ``scheme``, ...).

        Returns:
            :class:`LogDensity` over the flattened tokens (``logp`` and ``stderr`` [N], N = prod of leading dims).
        """
        x2, c2 = self._check(x, c)
        kw = dict(lam_min=self.lam_min, lam_max=self.lam_max, control_variate=None, progress=False)
        kw.update(formula_kwargs)
        return log_density(self.eps, x2, n_t=n_t, seed=seed, cond=c2, **kw)


# ------------------------------------------------------------------------------------------- AR backbone
class CausalTransformerAR(nn.Module):
    """A small causal Transformer over sequences of continuous tokens with a pluggable output head.

    Token ``k`` is predicted from tokens ``< k``: the inputs are shifted right behind a learned start token,
    projected to ``width``, given learned positional embeddings and passed through a causally masked
    ``nn.TransformerEncoder``; its output at position ``k`` is the condition ``c_k`` of the head.

    Args:
        token_dim: D. seq_len: L. head: an ``nn.Module`` with ``forward(x [N, D], c [N, C]) -> loss``,
            ``log_prob(x, c) -> LogDensity`` and ``sample(c, ...) -> [N, D]`` (a :class:`DiffusionLoss`, or a
            Gaussian/mixture-density layer for comparison) whose ``cond_dim`` equals ``width``.
        width, depth, heads: Transformer size.
    """

    def __init__(self, token_dim: int, seq_len: int, head: nn.Module, width: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.token_dim, self.seq_len, self.width = int(token_dim), int(seq_len), int(width)
        self.inp = nn.Linear(token_dim, width)
        self.start = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = head
        self.register_buffer("causal", torch.triu(torch.full((seq_len, seq_len), float("-inf")), 1), persistent=False)

    def conditions(self, x: Tensor) -> Tensor:
        """Conditions ``c`` [B, L, width] for sequences ``x`` [B, L, D] (``c_k`` depends on ``x_{<k}`` only)."""
        if x.dim() != 3 or x.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(f"sequences must have shape [B, {self.seq_len}, {self.token_dim}], got {tuple(x.shape)}")
        check_data(x.flatten(1), "sequences")
        h = torch.cat([self.start.expand(x.shape[0], -1, -1), self.inp(x[:, :-1])], 1) + self.pos
        return self.norm(self.encoder(h, mask=self.causal, is_causal=True))

    def forward(self, x: Tensor) -> Tensor:
        """Training loss of sequences ``x`` [B, L, D] (the head's loss averaged over tokens)."""
        c = self.conditions(x)
        return self.head(x.reshape(-1, self.token_dim), c.reshape(-1, self.width))

    @torch.no_grad()
    def log_prob(self, x: Tensor, **kwargs) -> LogDensity:
        """Per-token ``log p(x_k | x_<k)`` [B*L] (nats, with stderr) by the head's ``log_prob``."""
        c = self.conditions(x)
        return self.head.log_prob(x.reshape(-1, self.token_dim), c.reshape(-1, self.width), **kwargs)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, **head_kwargs) -> Tensor:
        """Draw ``n`` sequences [n, L, D] token by token (``head_kwargs`` go to the head's ``sample``)."""
        x = torch.zeros(n, self.seq_len, self.token_dim)
        for k in range(self.seq_len):
            c = self.conditions(x)[:, k]
            x[:, k] = self.head.sample(c, generator=generator, **head_kwargs)
        return x


# ------------------------------------------------------------------------------------ synthetic AR data
class BimodalARProcess:
    """Sequences of continuous tokens with an exact, bimodal conditional density (a test bed for AR heads).

    ``x_0 = 0`` (virtual), and for ``k = 1..L``, with ``h = tanh(W x_{k-1})``::

        x_k | x_<k ~ 1/2 N(m + delta, s^2 I) + 1/2 N(m - delta, s^2 I),   m = 0.9 h,   delta = r u (1 + 0.5 h_1)

    with a fixed random ``W`` (spectral norm 1.2) and unit vector ``u``. A Gaussian output layer cannot fit the
    two modes; a mixture-density or diffusion head can. ``log_prob`` is exact per token.

    Args:
        token_dim: D. seq_len: L. sep: mode half-separation ``r``. std: ``s``. seed: fixes ``W`` and ``u``.
    """

    def __init__(self, token_dim: int = 4, seq_len: int = 6, sep: float = 0.6, std: float = 0.15, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(token_dim, token_dim, generator=g, dtype=torch.float64)
        self.w = 1.2 * w / torch.linalg.matrix_norm(w, ord=2)
        u = torch.randn(token_dim, generator=g, dtype=torch.float64)
        self.u = u / u.norm()
        self.token_dim, self.seq_len, self.sep, self.std = token_dim, seq_len, sep, std

    def _params(self, prev: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(prev @ self.w.T)
        return 0.9 * h, self.sep * (1 + 0.5 * h[..., :1]) * self.u

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` sequences [n, L, D] (float32)."""
        x = torch.zeros(n, self.seq_len + 1, self.token_dim, dtype=torch.float64)
        for k in range(1, self.seq_len + 1):
            m, delta = self._params(x[:, k - 1])
            sign = torch.randint(0, 2, (n, 1), generator=generator, dtype=torch.float64) * 2 - 1
            noise = torch.randn(n, self.token_dim, generator=generator, dtype=torch.float64)
            x[:, k] = m + sign * delta + self.std * noise
        return x[:, 1:].to(torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x_k | x_<k)`` per token [n, L] (float64 nats) of sequences ``x`` [n, L, D]."""
        x = x.to(torch.float64)
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        m, delta = self._params(prev)
        d = self.token_dim
        const = -0.5 * d * math.log(2 * math.pi * self.std**2) - math.log(2)
        lp = [-0.5 * ((x - m - sgn * delta) ** 2).sum(-1) / self.std**2 for sgn in (1.0, -1.0)]
        return const + torch.logaddexp(lp[0], lp[1])
