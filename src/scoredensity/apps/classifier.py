"""The diffusion classifier (docs/design.md §4, Li & Yan 2024 §4): ``argmax_y log p(x | y) + log p(y)`` with each
``log p(x | y)`` from the density formula of a class-conditional denoiser.

A class-conditional noise predictor is called as ``eps_fn(x_t [N, *shape], t [N] float64, y=labels [N])`` (the
convention of :mod:`scoredensity.nets`; the null label ``num_classes`` is the unconditional model that label
dropout trains). With the formula (docs/design.md §2, in log-SNR)

    log p(x | y) = noisy_end(x) + clean_end + 1/2 ∫ [ sigmoid(lam) ||z||^2 - ||z - eps(x_t, t, y)||^2 ] dlam,

the end terms do not depend on ``y``, and with **the same lam and z for every class** (common random numbers)
most of the noise of the integral is common to all classes too: it cancels in the log-odds
``log p(x | a) - log p(x | b)``, whose standard error comes from paired differences. The budget is spent in
rounds; after each round, a class whose log-posterior is behind the leader's by more than ``z_threshold`` paired
standard errors is dropped for that example (adaptive elimination), so the evaluations go to the close classes.

``weighting="uniform"`` is the diffusion-classifier literature's rule for comparison (Li et al. 2023, "Your
diffusion model is secretly a zero-shot classifier"): the class score is ``-E_{k, z} ||z - eps(x_k, t_k, y)||^2``
with ``k`` uniform over the steps of DDPM's linear schedule; the posterior is the softmax of the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import rng
from ..decoders import end_terms
from ..epsfn import (
    PRECISIONS,
    autocast_context,
    check_data,
    resolve_lam_range,
    resolve_max_batch,
    row_blocks,
    work_device,
)
from ..formula import formula_integrand
from ..mixtures import GaussianMixture
from ..proposals import LambdaProposal
from ..rng import Stream
from ..schedules import DDPMSchedule, linear_betas

__all__ = [
    "classify",
    "ClassifierResult",
    "MixtureClassConditional",
    "bayes_log_posterior",
    "expected_calibration_error",
    "confusion_matrix",
    "WEIGHTINGS",
]

WEIGHTINGS = ("formula", "uniform")


# ---------------------------------------------------------------------------------------- exact references
class MixtureClassConditional:
    """Exact class-conditional ``eps`` of a Gaussian mixture whose classes are its components.

    ``model(x_t, t, y=labels)`` returns, row by row, the exact ``eps*`` of component ``y`` alone (a
    ``GaussianMixture.gaussian``); the null label ``K`` (or ``y=None``) gives the whole mixture's ``eps*``, as a
    label-dropout network would. ``num_classes = K``. It computes on the device of ``x_t`` (the parameters are
    copied there once per device).
    """

    def __init__(self, gm: GaussianMixture):
        self.gm = gm
        self.num_classes = gm.num_components
        self.components = [GaussianMixture.gaussian(gm.means[k], gm.covs[k]) for k in range(gm.num_components)]
        self._on: dict[torch.device, list[GaussianMixture]] = {gm.device: [*self.components, gm]}

    def _models(self, device: torch.device) -> list[GaussianMixture]:
        """The components and (last) the whole mixture, with parameters on ``device``."""
        if device not in self._on:
            self._on[device] = [m.to(device) for m in (*self.components, self.gm)]
        return self._on[device]

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        models = self._models(x_t.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        if y is None:
            return models[-1].eps(x_t, t)
        y = torch.as_tensor(y, device=x_t.device).long()
        if y.shape != (x_t.shape[0],) or (y < 0).any() or (y > self.num_classes).any():
            raise ValueError(f"labels must be [B] integers in 0..{self.num_classes} ({self.num_classes} = null label)")
        out = torch.empty_like(x_t)
        for k in y.unique().tolist():  # one call per class present, not per example
            rows = y == k
            out[rows] = models[k].eps(x_t[rows], t[rows]).to(out.dtype)
        return out


def bayes_log_posterior(gm: GaussianMixture, x: Tensor, classes: Sequence[int] | None = None) -> Tensor:
    """Exact log-posterior [B, C] of the mixture's components given ``x`` [B, d] (the Bayes classifier), over
    ``classes`` (default all components, renormalised over the subset)."""
    classes = list(range(gm.num_components)) if classes is None else list(classes)
    joint = torch.stack(
        [GaussianMixture.gaussian(gm.means[k], gm.covs[k]).log_prob(x) + gm.weights[k].log() for k in classes], 1
    )
    return torch.log_softmax(joint, 1)


# ---------------------------------------------------------------------------------------- result
@dataclass
class ClassifierResult:
    """Output of :func:`classify`.

    Attributes:
        classes: the candidate labels, in column order.
        log_posterior: [B, C] estimated ``log p(y | x)`` (float64); ``stderr`` [B, C] its delta-method standard error.
        log_likelihood: [B, C] ``log p(x | y)`` by the formula (nats), or the uniform-weighting score.
        covariance: [B, C, C] Monte Carlo covariance of ``log_likelihood`` across classes (common draws make
            it far from diagonal).
        prediction: [B] predicted labels (values from ``classes``).
        rounds: [B, C] rounds each class received before it was eliminated or the budget ran out.
        nfe: [B] model evaluations per example (the shared pilot included, spread over the batch).
        weighting: ``"formula"`` or ``"uniform"``. info: settings.
    """

    classes: list[int]
    log_posterior: Tensor
    stderr: Tensor
    log_likelihood: Tensor
    covariance: Tensor
    prediction: Tensor
    rounds: Tensor
    nfe: Tensor
    weighting: str
    info: dict = field(default_factory=dict)

    def log_odds(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        """``log p(a | x) - log p(b | x)`` [B] and its standard error [B] (paired: the common noise cancels).
        ``a`` and ``b`` are labels from :attr:`classes`."""
        i, j = self.classes.index(a), self.classes.index(b)
        value = self.log_posterior[:, i] - self.log_posterior[:, j]
        var = self.covariance[:, i, i] + self.covariance[:, j, j] - 2 * self.covariance[:, i, j]
        return value, var.clamp_min(0).sqrt()

    def accuracy(self, labels: Tensor) -> float:
        """Share of correct predictions."""
        return float((self.prediction == torch.as_tensor(labels)).double().mean())

    def probabilities(self) -> Tensor:
        """Posterior probabilities [B, C]."""
        return self.log_posterior.exp()


# ---------------------------------------------------------------------------------------- checks
def _num_classes_of(eps_fn) -> int | None:
    cfg = getattr(eps_fn, "config", None)
    if isinstance(cfg, dict) and "num_classes" in cfg:
        return int(cfg["num_classes"])
    k = getattr(eps_fn, "num_classes", None)
    return int(k) if k is not None else None


def _resolve_classes(eps_fn, classes, num_classes) -> list[int]:
    known = num_classes if num_classes is not None else _num_classes_of(eps_fn)
    if known is not None and known <= 0:
        raise ValueError(
            "the model is unconditional (num_classes = 0): the classifier needs a class-conditional model "
            "(train one with `scoredensity train --conditional`)"
        )
    if classes is None:
        if known is None:
            raise ValueError("give `classes` (the model does not say how many classes it was trained on)")
        classes = list(range(known))
    classes = [int(c) for c in classes]
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to classify, got {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {classes}")
    if known is not None:
        bad = [c for c in classes if not 0 <= c < known]
        if bad:
            raise ValueError(f"labels {bad} are outside the trained classes 0..{known - 1}")
    elif any(c < 0 for c in classes):
        raise ValueError(f"labels must be non-negative, got {classes}")
    return classes


def _resolve_prior(log_prior, classes: list[int]) -> Tensor:
    c = len(classes)
    if log_prior is None:
        return torch.full((c,), -math.log(c), dtype=torch.float64)
    lp = torch.as_tensor(log_prior, dtype=torch.float64)
    if lp.shape != (c,):
        raise ValueError(
            f"log_prior must have one entry per class: shape ({c},) for classes {classes}, got {tuple(lp.shape)}"
        )
    if not torch.isfinite(lp).all():
        raise ValueError("log_prior must be finite (drop a class instead of giving it probability 0)")
    total = float(torch.logsumexp(lp, 0))
    if abs(total) > 1e-6:
        raise ValueError(f"log_prior must be normalised over the classes (logsumexp = {total:.3g}, expected 0)")
    return lp


def _call(eps_fn, x_t: Tensor, t: Tensor, y: Tensor, precision: str = "fp32") -> Tensor:
    """``eps_fn(x_t, t, y=y)`` with the network autocast to ``precision``, checked; half outputs come back float32."""
    try:
        with autocast_context(precision, x_t.device):
            out = eps_fn(x_t, t, y=y)
    except TypeError as err:
        raise ValueError(
            f"the model does not accept class labels (calling it with y= failed: {err}); the classifier needs a "
            "class-conditional model eps_fn(x_t, t, y=labels)"
        ) from None
    if not isinstance(out, Tensor) or out.shape != x_t.shape:
        raise ValueError(f"the model returned {getattr(out, 'shape', type(out))} for input of shape {tuple(x_t.shape)}")
    if not torch.isfinite(out.flatten(1)).all():
        raise ValueError("the model returned NaN/Inf")
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _check_conditional(eps_fn, x: Tensor, classes: list[int]) -> None:
    """Refuse a model whose output does not depend on the label (an unconditional model). Probes the first few
    points at ``t = 0.64`` with keyed noise (:attr:`~scoredensity.rng.Stream.CLASSIFIER_CHECK`) on their device."""
    b = min(4, x.shape[0])
    dev = work_device(x)
    keys = rng.example_keys(None, b, dev)
    noise = rng.normals(0, rng.Stream.CLASSIFIER_CHECK, keys, tuple(x.shape[1:]), device=dev).to(x.device)
    xt = (0.6 * x[:b].to(torch.float64) + 0.8 * noise).to(x.dtype)
    t = torch.full((b,), 0.64, dtype=torch.float64, device=dev)
    e0 = _call(eps_fn, xt, t, torch.full((b,), classes[0], dtype=torch.long, device=x.device))
    e1 = _call(eps_fn, xt, t, torch.full((b,), classes[1], dtype=torch.long, device=x.device))
    if torch.equal(e0, e1):
        raise ValueError(
            "the model's output does not depend on the class label: an unconditional model was passed where a "
            "class-conditional one is needed"
        )


# ---------------------------------------------------------------------------------------- the estimator
class _Rows:
    """Evaluates the per-node values of (example, class) pairs on shared or independent draws.

    Everything runs on ``dev`` (the data's device; the CPU for MPS data, whose float64 work cannot run there):
    the keyed draws, ``x_t`` and the sums; the network gets ``x_t`` on ``x``'s own device and
    ``t`` (float64) on ``dev``, as in :func:`scoredensity.formula.log_density`."""

    def __init__(self, eps_fn, x, classes, weighting, proposal, schedule, crn, seed, max_batch, precision="fp32"):
        self.eps_fn, self.x, self.classes, self.precision = eps_fn, x, classes, precision
        self.weighting, self.proposal, self.schedule = weighting, proposal, schedule
        self.crn, self.seed, self.max_batch = crn, seed, max_batch
        self.shape = tuple(x.shape[1:])
        self.dev = work_device(x)
        self.labels = torch.as_tensor(classes, dtype=torch.long, device=self.dev)  # [C]
        self.times = None if schedule is None else schedule.times.to(self.dev)
        self.calls = 0

    def draws(self, key: Tensor, step: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Stratified nodes for keys [P]: ``(t [P, n], weight [P, n], z [P, n, *shape])`` (two draws per stratum)."""
        strata = n // 2
        u = rng.uniforms(self.seed, Stream.CLASSIFIER_LAM, key, n, step=step, device=self.dev)
        u = (torch.arange(strata, dtype=torch.float64, device=self.dev).repeat_interleave(2)[None] + u) / strata
        if self.weighting == "formula":
            lam = self.proposal.icdf(u)
            w = 1.0 / self.proposal.pdf(lam)
            t = torch.sigmoid(-lam)
        else:
            k = (u * self.schedule.num_steps).floor().long().clamp(max=self.schedule.num_steps - 1)
            t = self.times[k]
            w = torch.ones_like(t)
        z = rng.normals(self.seed, Stream.CLASSIFIER_NOISE, key, (n, *self.shape), step=step, device=self.dev)
        return t, w, z

    def values(self, ex: Tensor, cls: Tensor, step: int, n: int, antithetic: bool = False) -> Tensor:
        """Importance-weighted integrand values for pairs (example ``ex`` [P], class position ``cls`` [P]):
        [P, n], or with ``antithetic`` [P, n/2], each the mean over the node's ``z`` and ``-z``."""
        c = len(self.classes)
        key = ex if self.crn else ex * c + cls + 10**9  # common draws: keyed by the example only
        if antithetic:
            t, w, z = self.draws(key, step, n // 2)
            t, w, z = torch.cat([t, t], 1), torch.cat([w, w], 1), torch.cat([z, -z], 1)
        else:
            t, w, z = self.draws(key, step, n)
        p = len(ex)
        xs = self.x[ex.to(self.x.device)].to(device=self.dev, dtype=torch.float64)
        bshape = (p, n) + (1,) * len(self.shape)
        x_t = (1 - t).sqrt().reshape(bshape) * xs[:, None] + t.sqrt().reshape(bshape) * z  # [P, n, *shape]
        labels = self.labels[cls].repeat_interleave(n).to(self.x.device)  # [P n]
        flat_x = x_t.reshape(p * n, *self.shape).to(device=self.x.device, dtype=self.x.dtype)
        flat_t = t.reshape(-1)
        flat_z = z.reshape(p * n, *self.shape)
        out = torch.empty(p * n, dtype=torch.float64, device=self.dev)
        for sl in row_blocks(p * n, self.max_batch):
            eps = _call(self.eps_fn, flat_x[sl], flat_t[sl], labels[sl], self.precision)  # t float64 on self.dev
            eps = eps.to(self.dev)
            if self.weighting == "formula":
                lam = torch.log1p(-flat_t[sl]) - torch.log(flat_t[sl])
                out[sl] = formula_integrand(flat_z[sl], eps, lam, True)
            else:
                out[sl] = -(flat_z[sl] - eps.to(torch.float64)).flatten(1).pow(2).sum(1)
        self.calls += p * n
        out = out.reshape(p, n) * w
        return 0.5 * (out[:, : n // 2] + out[:, n // 2 :]) if antithetic else out


def _fit_pilot_proposal(rows: _Rows, b: int, lam_min: float, lam_max: float, examples: int, nodes: int):
    """A proposal ∝ RMS of the class-dependent part of the integrand (each class minus the class mean)."""
    pick = torch.linspace(0, b - 1, min(b, examples)).round().long().unique().to(rows.dev)
    c = len(rows.classes)
    saved = rows.proposal
    rows.proposal = LambdaProposal.uniform(lam_min, lam_max)
    ex = pick.repeat_interleave(c)
    cls = torch.arange(c, device=rows.dev).repeat(len(pick))
    crn = rows.crn
    rows.crn = True
    vals = rows.values(ex, cls, step=-1, n=nodes).reshape(len(pick), c, nodes)
    t, _, _ = rows.draws(pick, -1, nodes)
    rows.crn = crn
    rows.proposal = saved
    lam = (torch.log1p(-t) - torch.log(t))[:, None, :].expand(-1, c, -1)
    width = lam_max - lam_min  # undo the uniform importance weight
    centred = vals / width - (vals / width).mean(1, keepdim=True)
    return LambdaProposal.fit(lam.flatten(), centred.flatten(), lam_min, lam_max)


def classify(
    eps_fn_cond,
    x: Tensor,
    classes: Sequence[int] | None = None,
    log_prior: Tensor | None = None,
    weighting: str = "formula",
    budget: int = 1024,
    *,
    round_size: int = 32,
    eliminate: bool = True,
    z_threshold: float = 4.0,
    min_rounds: int = 1,
    common_random_numbers: bool = True,
    antithetic: bool = True,
    importance: str | LambdaProposal = "adaptive",
    lam_min: float | None = None,
    lam_max: float | None = None,
    num_steps: int = 1000,
    num_classes: int | None = None,
    check_conditional: bool = True,
    pilot_examples: int = 64,
    pilot_nodes: int = 16,
    seed: int = 0,
    max_batch: int | None = None,
    precision: str = "fp32",
    chunk_size: int | None = None,
) -> ClassifierResult:
    """Class log-posteriors by the density formula of a class-conditional denoiser, with standard errors.

    Args:
        eps_fn_cond: ``eps_fn(x_t [N, *shape], t [N] float64, y=labels [N]) -> [N, *shape]``.
        x: [B, *shape] points to classify.
        classes: candidate labels (default ``range(num_classes)`` of the model).
        log_prior: [C] log-probabilities of ``classes`` (normalised); default uniform.
        weighting: ``"formula"`` (likelihood weighting: the density formula) or ``"uniform"`` (unweighted
            denoising errors over uniformly drawn DDPM steps, as in the diffusion-classifier literature).
        budget: model evaluations per example (all classes together).
        round_size: evaluations per class per round (two independent nodes per stratum, for an honest standard
            error).
        eliminate: drop classes behind the leader by more than ``z_threshold`` paired standard errors, after at
            least ``min_rounds`` rounds.
        common_random_numbers: the same (t, z) for every class of an example (else independent draws per class).
        antithetic: evaluate each node at ``z`` and ``-z`` (cancels the part of the log-odds noise that is odd in
            ``z``, the largest part; ``round_size`` must then be a multiple of 4).
        importance: ``"adaptive"`` (a shared pilot fits a log-SNR proposal to the class-dependent part of the
            integrand), ``"uniform"``, or a :class:`LambdaProposal` on ``[lam_min, lam_max]`` (formula only).
        lam_min, lam_max: log-SNR range of the formula, closed by exact end terms; ``None`` (default): the
            model's own ``lam_range`` (a network from ``load_run``), else [-20, 20].
        num_steps: DDPM steps of the linear schedule for ``weighting="uniform"``.
        num_classes: classes the model was trained on, when it does not say (``model.config["num_classes"]`` or
            ``model.num_classes``).
        check_conditional: refuse a model whose output ignores the label.
        seed: randomness keyed by (seed, round, example) through :mod:`scoredensity.rng` (streams
            ``CLASSIFIER_LAM``, ``CLASSIFIER_NOISE``), generated on the data's device: results do not depend on
            batching or on ``max_batch``, and the draws are the same on every device.
        max_batch: rows per network call (default ~2^18 / d); results do not depend on it.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast of the network call only; the integrand, the
            sums and the log-odds stay float64.
        chunk_size: deprecated alias of ``max_batch`` (DeprecationWarning).

    The work runs on the device of ``x`` (which must be the model's) under ``torch.inference_mode()``: the
    draws, the network calls and the float64 sums stay there, with no Python loop over examples; the results come
    back on the CPU, without autograd history.

    Returns:
        :class:`ClassifierResult` (tensors on the CPU).

    Raises:
        ValueError: labels outside the trained classes, a prior that does not match the classes, an
            unconditional model, a budget smaller than one round, bad data.
    """
    x = check_data(x)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    classes = _resolve_classes(eps_fn_cond, classes, num_classes)
    lam_min, lam_max = resolve_lam_range(eps_fn_cond, lam_min, lam_max)
    c = len(classes)
    unit = 4 if antithetic else 2
    if round_size < unit or round_size % unit:
        raise ValueError(f"round_size must be a positive multiple of {unit}, got {round_size}")
    if budget < c * round_size:
        raise ValueError(f"budget {budget} is below one round ({c} classes x {round_size} nodes = {c * round_size})")
    b, d = x.shape[0], x[0].numel()
    if max_batch is None and chunk_size is None:
        max_batch = max(1, (1 << 18) // d)
    max_batch = resolve_max_batch(max_batch, d, chunk_size)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = work_device(x)
    lp = _resolve_prior(log_prior, classes).to(dev)

    proposal = None
    schedule = None
    if weighting == "formula":
        if isinstance(importance, LambdaProposal):
            if (importance.lam_min, importance.lam_max) != (lam_min, lam_max):
                raise ValueError("the proposal's range differs from [lam_min, lam_max]")
            proposal = importance
        elif importance in ("uniform", "adaptive"):
            proposal = LambdaProposal.uniform(lam_min, lam_max)
        else:
            raise ValueError(f"importance must be 'adaptive', 'uniform' or a LambdaProposal, got {importance!r}")
    else:
        schedule = DDPMSchedule(linear_betas(num_steps))  # DDPM's linear 1e-4..0.02
    with torch.inference_mode():
        if check_conditional:
            _check_conditional(eps_fn_cond, x, classes)
        rows = _Rows(
            eps_fn_cond, x, classes, weighting, proposal, schedule, common_random_numbers, seed, max_batch, precision
        )
        pilot_calls = 0
        if weighting == "formula" and importance == "adaptive":
            rows.proposal = _fit_pilot_proposal(rows, b, lam_min, lam_max, pilot_examples, pilot_nodes)
            pilot_calls = rows.calls
        mean, cov, n_rounds, spent = _rounds(
            rows, b, lp, budget, round_size, eliminate, z_threshold, min_rounds, antithetic
        )
        if weighting == "formula":
            noisy, clean = end_terms(x.to(dev), lam_min, lam_max)
            loglik = mean + (noisy + clean)[:, None]
        else:
            loglik = mean
        scores = loglik + lp[None]
        log_post = torch.log_softmax(scores, 1)
        p = log_post.exp()
        jac = torch.eye(c, dtype=torch.float64, device=dev)[None] - p[:, None, :]  # row i: e_i - p
        post_cov = jac @ cov @ jac.transpose(1, 2)
        pred = rows.labels[log_post.argmax(1)]
        stderr = post_cov.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        nfe = spent.to(torch.float64) + pilot_calls / b
    return ClassifierResult(
        classes=classes,
        log_posterior=_cpu(log_post),
        stderr=_cpu(stderr),
        log_likelihood=_cpu(loglik),
        covariance=_cpu(cov),
        prediction=_cpu(pred),
        rounds=_cpu(n_rounds),
        nfe=_cpu(nfe),
        weighting=weighting,
        info={
            "budget": budget,
            "round_size": round_size,
            "eliminate": eliminate,
            "z_threshold": z_threshold,
            "common_random_numbers": common_random_numbers,
            "antithetic": antithetic,
            "importance": importance if isinstance(importance, str) else "proposal",
            "lam_min": lam_min,
            "lam_max": lam_max,
            "num_steps": num_steps if weighting == "uniform" else None,
            "seed": seed,
            "precision": precision,
            "max_batch": max_batch,
            "pilot_calls": pilot_calls,
            "device": str(dev),
        },
    )


def _cpu(v: Tensor) -> Tensor:
    """A normal (not inference-mode) CPU copy of a result tensor."""
    return v.detach().to("cpu").clone()


def _rounds(
    rows: _Rows,
    b: int,
    lp: Tensor,
    budget: int,
    round_size: int,
    eliminate: bool,
    z_threshold: float,
    min_rounds: int,
    antithetic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Spend the budget in rounds over the alive (example, class) pairs, all examples of a round in one batch.

    Returns:
        ``(mean [B, C], covariance of the mean [B, C, C], rounds [B, C], calls spent [B])`` on ``rows.dev``.
    """
    dev, c = rows.dev, len(rows.classes)
    total = torch.zeros(b, c, dtype=torch.float64, device=dev)  # sum of round estimates
    cov_sum = torch.zeros(b, c, c, dtype=torch.float64, device=dev)  # sum of per-round covariances over shared rounds
    n_rounds = torch.zeros(b, c, dtype=torch.long, device=dev)
    alive = torch.ones(b, c, dtype=torch.bool, device=dev)
    spent = torch.zeros(b, dtype=torch.long, device=dev)
    strata = round_size // (4 if antithetic else 2)
    step = 0
    while True:
        active = alive.sum(1) * round_size + spent <= budget  # the next round fits in the budget
        if eliminate:
            active &= alive.sum(1) > 1  # a decided example stops
        if not bool(active.any()):
            break
        ex_idx, cls_idx = (alive & active[:, None]).nonzero(as_tuple=True)
        vals = rows.values(ex_idx, cls_idx, step, round_size, antithetic)  # [P, n] or [P, n/2]
        pairs = vals.reshape(-1, strata, 2)
        est = pairs.mean((1, 2))  # [P]
        half_diff = 0.5 * (pairs[:, :, 0] - pairs[:, :, 1])  # [P, S]: var per stratum = half_diff^2
        total[ex_idx, cls_idx] += est
        n_rounds[ex_idx, cls_idx] += 1
        spent += torch.bincount(ex_idx, minlength=b) * round_size
        # covariance across the alive classes of each example (zero across classes without common draws)
        dense = torch.zeros(b, c, strata, dtype=torch.float64, device=dev)
        dense[ex_idx, cls_idx] = half_diff
        cov_r = torch.einsum("bis,bjs->bij", dense, dense) / strata**2
        if not rows.crn:
            cov_r = torch.diag_embed(cov_r.diagonal(dim1=1, dim2=2))
        cov_sum += cov_r
        step += 1
        if eliminate:
            _eliminate(total, cov_sum, n_rounds, alive, active, lp, z_threshold, min_rounds)
    if bool((n_rounds == 0).any()):
        raise RuntimeError("internal error: a class received no evaluation")  # pragma: no cover
    nr = n_rounds.to(torch.float64)
    return total / n_rounds, cov_sum / (nr[:, :, None] * nr[:, None, :]), n_rounds, spent


def _eliminate(total, cov_sum, n_rounds, alive, active, lp, z_threshold, min_rounds) -> None:
    """Drop, in place, alive classes clearly behind the leader of each active example."""
    nr = n_rounds.clamp_min(1).to(torch.float64)
    score = total / nr + lp[None]
    score = torch.where(alive, score, torch.full_like(score, -math.inf))
    lead = score.argmax(1)  # [B]
    ar = torch.arange(len(lead), device=lead.device)
    var = cov_sum.diagonal(dim1=1, dim2=2) / nr**2  # [B, C]
    cross = cov_sum[ar, lead] / (nr * nr[ar, lead][:, None])  # [B, C]
    diff_var = var[ar, lead][:, None] + var - 2 * cross
    gap = score[ar, lead][:, None] - score
    behind = gap > z_threshold * diff_var.clamp_min(0).sqrt()
    ready = (n_rounds[ar, lead] >= min_rounds)[:, None] & (n_rounds >= min_rounds)
    drop = behind & ready & alive & active[:, None]
    drop[ar, lead] = False
    alive &= ~drop


# ---------------------------------------------------------------------------------------- metrics
def expected_calibration_error(prob: Tensor, labels: Tensor, classes: Sequence[int], bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): ``sum_bins n_b / N |accuracy_b - confidence_b|`` over equal-width
    bins of the top-class probability. ``prob`` [B, C] over ``classes``; ``labels`` [B]."""
    labels = torch.as_tensor(labels)
    conf, top = prob.max(1)
    correct = (torch.as_tensor(list(classes))[top] == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(conf.double(), edges[1:-1])
    ece = 0.0
    for k in range(bins):
        m = which == k
        if m.any():
            ece += float(m.double().mean()) * abs(float(correct[m].mean()) - float(conf[m].double().mean()))
    return ece


def confusion_matrix(labels: Tensor, prediction: Tensor, classes: Sequence[int]) -> Tensor:
    """Counts [C, C]: row = true class, column = predicted class, in the order of ``classes``."""
    labels = torch.as_tensor(labels).long().flatten().cpu()
    prediction = torch.as_tensor(prediction).long().flatten().cpu()
    if labels.shape != prediction.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and prediction {tuple(prediction.shape)} differ in length")
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    is_y, is_p = labels[:, None] == cls[None], prediction[:, None] == cls[None]  # [B, C]
    keep = is_y.any(1) & is_p.any(1)  # pairs outside ``classes`` are not counted
    iy, ip = is_y[keep].long().argmax(1), is_p[keep].long().argmax(1)
    out = torch.zeros(len(cls), len(cls), dtype=torch.long)
    return out.index_put_((iy, ip), torch.ones_like(iy), accumulate=True)
