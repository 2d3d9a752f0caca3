"""DiffusionLoss vs a Gaussian and a mixture-density output layer on one causal Transformer (issue 8 §2).

Data: :class:`~scoredensity.apps.diffusion_loss.BimodalARProcess` (sequences of 6 tokens in R^4 whose
conditionals are two-mode Gaussian mixtures, exact log-density known). The same backbone
(:class:`~scoredensity.apps.diffusion_loss.CausalTransformerAR`), optimiser, steps and data stream for every head:

* ``gaussian``: full-covariance Gaussian layer (mean and Cholesky factor from ``c``), exact NLL;
* ``mdn``: mixture-density layer, K diagonal Gaussians (Bishop 1994), exact NLL;
* ``diffusion``: :class:`~scoredensity.apps.diffusion_loss.DiffusionLoss` (likelihood weighting), NLL as the
  density formula's bound (``log_prob``) with its standard error.

Reported: held-out NLL per dimension (nats) against the exact one, sampling speed (tokens/s), and the exact
log-density per dimension of generated sequences under the true process (a sample-quality check whose
reference is the exact value on real data).

Run (a few minutes on 2 CPU cores)::

    python benchmarks/diffusion_loss.py --out bench_out/diffusion_loss
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoredensity.apps.diffusion_loss import BimodalARProcess, CausalTransformerAR, DiffusionLoss
from scoredensity.logdensity import LogDensity

_LOG_2PI = math.log(2 * math.pi)


class GaussianHead(nn.Module):
    """``p(x | c) = N(mu(c), L(c) L(c)^T)`` with a lower-triangular ``L`` (softplus diagonal)."""

    def __init__(self, token_dim: int, cond_dim: int, hidden: int = 128):
        super().__init__()
        self.d = token_dim
        self.tril = torch.tril_indices(token_dim, token_dim, -1)
        n_out = token_dim + token_dim + self.tril.shape[1]
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, n_out))

    def _params(self, c: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(c)
        d = self.d
        mu, diag, off = out[:, :d], F.softplus(out[:, d : 2 * d]) + 1e-4, out[:, 2 * d :]
        chol = torch.diag_embed(diag)
        chol[:, self.tril[0], self.tril[1]] = off
        return mu, chol

    def _logp(self, x: Tensor, c: Tensor) -> Tensor:
        mu, chol = self._params(c)
        r = torch.linalg.solve_triangular(chol, (x - mu)[:, :, None], upper=False)[:, :, 0]
        return -0.5 * (r**2).sum(1) - chol.diagonal(dim1=1, dim2=2).log().sum(1) - 0.5 * self.d * _LOG_2PI

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return -self._logp(x, c).mean()

    @torch.no_grad()
    def log_prob(self, x: Tensor, c: Tensor, **_) -> LogDensity:
        lp = self._logp(x, c).double()
        return LogDensity(logp=lp, stderr=torch.zeros_like(lp), nfe=0.0, dim=self.d, method="gaussian")

    @torch.no_grad()
    def sample(self, c: Tensor, generator=None, temperature: float = 1.0, **_) -> Tensor:
        mu, chol = self._params(c)
        return mu + temperature * (chol @ torch.randn(*mu.shape, 1, generator=generator))[:, :, 0]


class MDNHead(nn.Module):
    """Mixture-density layer: ``K`` diagonal Gaussian components."""

    def __init__(self, token_dim: int, cond_dim: int, k: int = 4, hidden: int = 128):
        super().__init__()
        self.d, self.k = token_dim, k
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, k * (2 * token_dim + 1)))

    def _params(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.net(c)
        k, d = self.k, self.d
        logits = out[:, :k].log_softmax(1)
        mu = out[:, k : k + k * d].reshape(-1, k, d)
        sd = F.softplus(out[:, k + k * d :]).reshape(-1, k, d) + 1e-4
        return logits, mu, sd

    def _logp(self, x: Tensor, c: Tensor) -> Tensor:
        logits, mu, sd = self._params(c)
        comp = (-0.5 * ((x[:, None] - mu) / sd) ** 2 - sd.log() - 0.5 * _LOG_2PI).sum(2)
        return torch.logsumexp(logits + comp, 1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return -self._logp(x, c).mean()

    @torch.no_grad()
    def log_prob(self, x: Tensor, c: Tensor, **_) -> LogDensity:
        lp = self._logp(x, c).double()
        return LogDensity(logp=lp, stderr=torch.zeros_like(lp), nfe=0.0, dim=self.d, method="mdn")

    @torch.no_grad()
    def sample(self, c: Tensor, generator=None, temperature: float = 1.0, **_) -> Tensor:
        logits, mu, sd = self._params(c)
        idx = torch.multinomial(logits.exp(), 1, generator=generator)[:, 0]
        rows = torch.arange(len(idx))
        return mu[rows, idx] + temperature * sd[rows, idx] * torch.randn(mu[rows, idx].shape, generator=generator)


def build(kind: str, proc: BimodalARProcess, width: int) -> CausalTransformerAR:
    """The shared backbone with the named head."""
    d = proc.token_dim
    if kind == "gaussian":
        head = GaussianHead(d, width)
    elif kind == "mdn":
        head = MDNHead(d, width)
    elif kind == "diffusion":
        head = DiffusionLoss(d, width, width=64, depth=2, data_std=0.4, lam_min=-12.0, lam_max=14.0)
    else:
        raise ValueError(kind)
    return CausalTransformerAR(d, proc.seq_len, head, width=width, depth=2, heads=4)


def train(model: nn.Module, proc: BimodalARProcess, steps: int, batch: int, seed: int) -> float:
    """Train on a fresh stream of sequences (same stream for every head); returns seconds."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=max(0.05, 2 / steps))
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        loss = model(proc.sample(batch, g))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/diffusion_loss")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--n-test", type=int, default=300, help="held-out sequences")
    p.add_argument("--n-t", type=int, default=32, help="log-SNR nodes per token for the diffusion head's NLL")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heads", nargs="+", default=["gaussian", "mdn", "diffusion"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc = BimodalARProcess()
    d = proc.token_dim
    test = proc.sample(args.n_test, torch.Generator().manual_seed(10_000))
    exact = proc.log_prob(test)  # [n, L]
    exact_pd = float(exact.mean()) / d
    exact_se = float(exact.sum(1).std() / math.sqrt(args.n_test)) / (d * proc.seq_len)
    print(f"exact held-out log-density: {exact_pd:.4f} ± {exact_se:.4f} nats/dim (NLL/dim {-exact_pd:.4f})")
    rows = []
    for kind in args.heads:
        model = build(kind, proc, args.width)
        sec = train(model, proc, args.steps, args.batch, args.seed)
        t0 = time.perf_counter()
        ld = model.log_prob(test, n_t=args.n_t) if kind == "diffusion" else model.log_prob(test)
        eval_s = time.perf_counter() - t0
        per_seq = ld.logp.reshape(args.n_test, proc.seq_len)
        diff = (per_seq - exact).sum(1) / (d * proc.seq_len)  # paired per sequence
        nll_pd = -float(per_seq.mean()) / d
        row = dict(
            head=kind,
            params=sum(p.numel() for p in model.head.parameters()),
            train_s=sec,
            nll_per_dim=nll_pd,
            gap_per_dim=float(-diff.mean()),
            gap_se=float(diff.std() / math.sqrt(args.n_test)),
            estimator_se_per_dim=ld.mean_stderr() / d,
            eval_s=eval_s,
        )
        variants = [("", {})]
        if kind == "diffusion":
            variants = [
                (" (posterior)", dict(steps=args.sample_steps, variance="posterior")),
                (" (tweedie)", dict(steps=args.sample_steps, variance="tweedie")),
            ]
        for suffix, kw in variants:
            g = torch.Generator().manual_seed(1)
            t0 = time.perf_counter()
            s = model.sample(500, generator=g, **kw)
            dt = time.perf_counter() - t0
            row["sample" + suffix.replace(" ", "_")] = dict(
                tokens_per_s=500 * proc.seq_len / dt, true_logp_per_dim=float(proc.log_prob(s).mean()) / d
            )
        rows.append(row)
        print(json.dumps(row))

    print(f"\n## Held-out NLL per dimension (nats), {args.steps} steps, batch {args.batch}, {args.n_test} sequences")
    print(f"exact NLL/dim {-exact_pd:.4f}; sample quality reference (true log-density/dim of real data) {exact_pd:.4f}")
    print(
        "| head | head params | NLL/dim | gap to exact (± paired se) | train s | sampling | tokens/s | true logp/dim |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for key in [k for k in r if k.startswith("sample")]:
            name = key.replace("sample", "").strip("_") or "exact"
            print(
                f"| {r['head']} | {r['params']} | {r['nll_per_dim']:.4f} | "
                f"{r['gap_per_dim']:.4f} ± {r['gap_se']:.4f} | "
                f"{r['train_s']:.0f} | {name} | {r[key]['tokens_per_s']:.0f} | {r[key]['true_logp_per_dim']:.4f} |"
            )
    (out / "diffusion_loss.json").write_text(
        json.dumps(dict(args=vars(args), exact_logp_per_dim=exact_pd, rows=rows), indent=1)
    )
    print(f"\nwrote {out / 'diffusion_loss.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
