"""The diffusion loss: a small denoising head for autoregressive models over continuous tokens (docs/design.md §4).

An autoregressive backbone (any network) turns the past into a vector ``c``; instead of a Gaussian or a
mixture-density output layer, a small MLP denoiser ``eps(x_t, t | c)`` models ``p(x | c)`` for the next token
``x`` in R^D, without vector quantisation (Li et al. 2024, "Autoregressive image generation without vector
quantization", the MAR recipe). Everything here is in canonical time ``x_t = sqrt(1-t) x + sqrt(t) z``.

* **Head** (:class:`DiffusionLoss`): residual MLP blocks with adaptive layer norm on ``y = emb(lam) + W c``
  (shift, scale and a zero-initialised gate per block, as in DiT/MAR), EDM input scaling and the
  v-parameterisation ``eps = sqrt(t) x_t + sqrt(1-t) c_out F`` (docs/design.md §1: right limit at ``t -> 1``).
* **Loss** (``forward``): ``weighting="elbo"`` is minus the density formula's one-sample bound in nats per
  token (:func:`scoredensity.losses.elbo_loss`: log-SNR uniform on ``[lam_min, lam_max]``, or drawn from the
  adaptive :class:`~scoredensity.losses.LamSampler` with ``lam_sampling="adaptive"``; the same end terms as
  :func:`scoredensity.formula.log_density`), so its minimiser maximises the likelihood; ``"simple"`` is DDPM's
  ``L_simple`` (``t`` uniform). As in MAR, each token is noised ``t_per_token`` times per step (the head is cheap
  next to the backbone).
* **log p(x | c)** (``log_prob``): :func:`scoredensity.formula.log_density` on the head with ``c`` bound, in nats
  with a standard error: a lower bound (in expectation) for a learned head, so an autoregressive model built
  on it reports a certified NLL.
* **Sampling** (``sample``): DDPM ancestral steps on a cosine grid, the noise of each reverse step multiplied
  by the temperature ``tau`` (MAR's recipe), by :func:`scoredensity.sampling.ancestral_sample`; the law the
  temperature gives (``N(mu, tau^2 S)`` for a Gaussian target) is derived in :mod:`scoredensity.sampling`.

Layout: the sampler and its exact Gaussian law live in :mod:`scoredensity.sampling`, the adaptive-layer-norm block
and the EDM scalings in :mod:`scoredensity.nets`, the synthetic test process :class:`BimodalARProcess` in
:mod:`scoredensity.data.toys`; they are re-exported here so that older imports keep working.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import rng
from ..data.toys import BimodalARProcess
from ..epsfn import EpsFn, autocast_context, check_data, check_precision, work_device
from ..formula import log_density
from ..logdensity import LogDensity
from ..losses import WEIGHTINGS, LamSampler, elbo_loss
from ..nets import AdaLNBlock, TimeEmbedding, edm_scalings, v_output
from ..sampling import ANCESTRAL_VARIANCES, ancestral_sample, cosine_lam_grid, gaussian_temperature_law

__all__ = [
    "DiffusionLoss",
    "ancestral_sample",
    "cosine_lam_grid",
    "gaussian_temperature_law",
    "CausalTransformerAR",
    "BimodalARProcess",
    "WEIGHTINGS",
    "LAM_SAMPLINGS",
]

LAM_SAMPLINGS = ("uniform", "adaptive")


def __getattr__(name: str):
    if name == "VARIANCES":
        warnings.warn(
            "scoredensity.apps.diffusion_loss.VARIANCES is deprecated: the sampler's step noises are "
            "scoredensity.sampling.ANCESTRAL_VARIANCES (ddpm.VARIANCES are DDPM's reverse variances)",
            DeprecationWarning,
            stacklevel=2,
        )
        return ANCESTRAL_VARIANCES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------- the head
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
        lam_sampling: where the ``elbo`` loss draws log-SNR: ``"uniform"`` on ``[lam_min, lam_max]`` (default) or
            ``"adaptive"`` (:class:`~scoredensity.losses.LamSampler`: a piecewise-constant density following the
            running RMS of the integrand, updated by every ``forward`` in training mode; the loss stays unbiased).

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
        lam_sampling: str = "uniform",
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
        if lam_sampling not in LAM_SAMPLINGS:
            raise ValueError(f"lam_sampling must be one of {LAM_SAMPLINGS}, got {lam_sampling!r}")
        if lam_sampling == "adaptive" and weighting != "elbo":
            raise ValueError("lam_sampling='adaptive' applies to weighting='elbo' only")
        self.token_dim = int(token_dim)
        self.cond_dim = int(cond_dim)
        self.weighting = weighting
        self.t_per_token = int(t_per_token)
        self.lam_min = float(lam_min)
        self.lam_max = float(lam_max)
        self.data_std = float(data_std)
        self.lam_sampler = (
            LamSampler("adaptive", lam_min, lam_max, low_discrepancy=False) if lam_sampling == "adaptive" else None
        )
        self.time_emb = TimeEmbedding(width, n_freq)
        self.cond_emb = nn.Linear(cond_dim, width)
        self.inp = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList([AdaLNBlock(width) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        for layer in (self.out_ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._register_load_state_dict_pre_hook(_upgrade_state_dict)

    # -- state of the adaptive log-SNR sampler travels with the weights (resuming keeps the proposal)
    def get_extra_state(self) -> dict:
        """The adaptive :class:`~scoredensity.losses.LamSampler`'s statistics (empty without one)."""
        return {} if self.lam_sampler is None else {"lam_sampler": self.lam_sampler.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore :meth:`get_extra_state` (a state without sampler statistics leaves the sampler fresh)."""
        if self.lam_sampler is not None and state.get("lam_sampler"):
            self.lam_sampler.load_state_dict(state["lam_sampler"])

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
        lam, c_in, c_out = edm_scalings(t, self.data_std)
        y = self.time_emb(lam) + self.cond_emb(c.to(torch.float32))
        h = self.inp((x_t.to(torch.float64) * c_in[:, None]).to(torch.float32))
        for blk in self.blocks:
            h = blk(h, y)
        shift, scale = self.out_ada(y).chunk(2, dim=-1)
        f = self.out(self.out_norm(h) * (1 + scale) + shift)
        return v_output(x_t, f, lam, c_out).to(x_t.dtype)

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
        self,
        x: Tensor,
        c: Tensor,
        mask: Tensor | None = None,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        step: int = 0,
        example_ids: Tensor | None = None,
        precision: str = "fp32",
    ) -> Tensor:
        """Diffusion loss of tokens ``x`` [..., D] given ``c`` [..., C], computed on their device.

        Each token is noised ``t_per_token`` times. ``elbo``: log-SNR ``lam ~ q`` on ``[lam_min, lam_max]``
        (uniform, or the adaptive proposal of ``lam_sampling``) and the loss
        ``-(noisy_end + clean_end + integrand / q(lam))`` per draw (:func:`scoredensity.losses.elbo_loss`: nats per
        token, an unbiased estimate of the negative bound that :meth:`log_prob` reports). ``simple``: ``t`` uniform
        on the same range and the mean over dimensions of ``||z - eps||^2``.

        The draws go through :mod:`scoredensity.rng` (streams ``DIFFLOSS_LAM``, ``DIFFLOSS_NOISE``) on the tokens'
        device: draw ``j`` of token ``i`` is keyed by ``(seed, step, example_ids[i], j)``, so it does not depend on
        the batch, and is the same on every device.

        Args:
            mask: optional [...] token weights (MAR's mask); the mean is then weighted.
            reduction: ``"mean"`` (scalar) or ``"none"`` (per token [...], averaged over the draws).
            generator: when ``seed`` is None, a fresh key is taken from this generator (default torch's global
                generator), so that successive training steps draw afresh.
            seed, step: key of the draws (e.g. the run's seed and the training step).
            example_ids: [N] integer keys of the flattened tokens (default ``0..N-1``).
            precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the head's network only; the loss, the
                end terms and the integrand stay float64.

        Returns:
            Scalar loss, or per-token losses with the leading shape of ``x``.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        check_precision(precision)
        lead = x.shape[:-1] if isinstance(x, Tensor) else None
        x2, c2 = self._check(x, c)
        n, r = x2.shape[0], self.t_per_token
        xr = x2.repeat(r, 1)  # draw-major: row j*n + i is draw j of token i
        cr = c2.repeat(r, 1)
        if seed is None:
            gdev = "cpu" if generator is None else generator.device
            seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=gdev))
        dev = work_device(x2)
        keys = rng.example_keys(example_ids, n, dev)
        u = rng.uniforms(seed, rng.Stream.DIFFLOSS_LAM, keys, r, step=step, device=dev)  # [n, r]
        z = rng.normals(seed, rng.Stream.DIFFLOSS_NOISE, keys, (r, self.token_dim), step=step, device=dev)
        u = u.T.reshape(-1).to(x2.device)  # [r n]
        z = z.transpose(0, 1).reshape(n * r, self.token_dim).to(x2.device)

        def net(x_t: Tensor, t: Tensor) -> Tensor:
            with autocast_context(precision, x_t.device):
                return self.eps(x_t, t, cr)

        if self.weighting == "elbo":
            if self.lam_sampler is None:
                lam = self.lam_min + (self.lam_max - self.lam_min) * u
                inv_q = torch.full_like(lam, self.lam_max - self.lam_min)
            else:
                lam, inv_q = self.lam_sampler.sample(u)  # the proposal's masses move to u's device
            per, f = elbo_loss(net, xr, lam, z, inv_q, self.lam_min, self.lam_max)
            if self.lam_sampler is not None and self.training:
                self.lam_sampler.update(self.lam_sampler.bin_stats(lam.cpu(), f.cpu()))
        else:
            lam = LamSampler("t_uniform", self.lam_min, self.lam_max).sample(u)[0]  # t uniform on the range
            t = torch.sigmoid(-lam)
            x_t = torch.sigmoid(lam).sqrt()[:, None] * xr.to(torch.float64) + t.sqrt()[:, None] * z
            eps = net(x_t.to(x2.dtype), t)
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
        _, c2 = self._check(None, c)
        out = ancestral_sample(
            self.eps_fn(c2),
            (c2.shape[0], self.token_dim),
            steps=steps,
            temperature=temperature,
            variance=variance,
            lam_min=self.lam_min,
            lam_max=self.lam_max,
            generator=generator,
            device=c2.device,
        )
        return out.reshape(*c.shape[:-1], self.token_dim)

    # -- likelihood
    @torch.no_grad()
    def log_prob(self, x: Tensor, c: Tensor, *, n_t: int = 128, seed: int = 0, **formula_kwargs) -> LogDensity:
        """``log p(x | c)`` per token by the density formula (:func:`scoredensity.formula.log_density`), in nats.

        One call of the estimator for all tokens: each token's ``c`` travels with its rows (``cond=``), and each
        token has its own random stream. It computes on the device of ``x``, ``c`` and the head (keyed draws
        there, under ``torch.inference_mode()``) and returns on the CPU; ``precision="bf16"`` autocasts the head
        only. For a learned head the value is, in expectation, a lower bound on the log-likelihood of the plug-in
        reverse SDE (Huang, Lim & Courville 2021).

        Args:
            x: [..., D] tokens. c: [..., C] conditions. n_t: log-SNR nodes per token (default 128, the
                estimators' default). seed: key of all randomness.
            formula_kwargs: passed to :func:`~scoredensity.formula.log_density` (``n_z``, ``scheme``,
                ``max_batch``, ``precision``, ...).

        Returns:
            :class:`LogDensity` over the flattened tokens (``logp`` and ``stderr`` [N], N = prod of leading dims).
        """
        x2, c2 = self._check(x, c)
        kw = dict(lam_min=self.lam_min, lam_max=self.lam_max, control_variate=None, progress=False)
        kw.update(formula_kwargs)
        return log_density(self.eps, x2, n_t=n_t, seed=seed, cond=c2, **kw)


def _upgrade_state_dict(state_dict, prefix, *args) -> None:
    """Load-state-dict hook for heads saved by older versions: the time embedding's MLP, once ``time_emb.0`` /
    ``time_emb.2``, now lives under ``time_emb.mlp`` (:class:`~scoredensity.nets.TimeEmbedding`), and a state
    without the sampler's extra state gets an empty one."""
    old = prefix + "time_emb."
    for key in [k for k in state_dict if k.startswith(old) and not k.startswith(old + "mlp.")]:
        state_dict[old + "mlp." + key[len(old) :]] = state_dict.pop(key)
    state_dict.setdefault(prefix + "_extra_state", {})


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
        x = torch.zeros(n, self.seq_len, self.token_dim, device=self.start.device)
        for k in range(self.seq_len):
            c = self.conditions(x)[:, k]
            x[:, k] = self.head.sample(c, generator=generator, **head_kwargs)
        return x
