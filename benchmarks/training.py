"""Training benchmark (issue 4): what the likelihood weighting and the log-SNR sampling buy, on CPU.

(a) ring8: held-out NLL bound (EMA weights, density formula) minus the exact NLL of the same test points, after
    the same number of steps (set from a wall-clock budget measured once) for every (weighting, lam sampling).
(b) digits (scikit-learn 8x8, 17 levels, 80/20 split, uniform dequantisation): held-out bits/dim of the diffusion
    model against scikit-learn's GaussianMixture, best over n_components and covariance types, fitted on the same
    dequantised training split (both figures are *dequantised* densities on the published scale).
(c) steps per second of :func:`scoredensity.train.train` against a plain reference loop written here for the
    same network, batch and loss (no EMA, logging, keyed noise or checkpoints).

Usage::

    python benchmarks/training.py --part a --budget 30
    python benchmarks/training.py --part b --steps 4000
    python benchmarks/training.py --part c
    python benchmarks/training.py            # all three

Prints one JSON line per measurement and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from scoredensity.data import load_dataset
from scoredensity.losses import keyed_normals
from scoredensity.nets import build_denoiser, denoiser_config
from scoredensity.train import TrainConfig, data_std, train

RING_NET = {"type": "mlp", "hidden": 128, "blocks": 2, "emb_dim": 64}
SCHEMES = [
    ("elbo", "adaptive"),
    ("elbo", "adaptive", -20.0, 20.0),
    ("elbo", "adaptive", -8.0, 8.0),
    ("elbo", "uniform"),
    ("elbo", "t_uniform"),
    ("simple", "t_uniform"),
    ("simple", "ddpm"),
    ("simple", "uniform"),
]


def _emit(rec: dict) -> dict:
    print(json.dumps(rec), flush=True)
    return rec


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench_train_"))


def part_a(
    budget: float | None, steps: int, seeds: list[int], eval_n: int, schemes: list[int] | None = None
) -> list[dict]:
    """ring8: bound - exact after the same number of steps for each weighting / sampling scheme.

    ``schemes``: indices into :data:`SCHEMES` to run (default all).

    With ``budget`` (seconds) the step count is set from a 200-step pilot on this machine; otherwise ``steps``
    (the same for every scheme: they share the network, so this is also the same wall-clock budget up to load).
    """
    d = _tmp()
    if budget is not None:
        t0 = time.perf_counter()
        cfg = TrainConfig(steps=200, batch_size=512, eval_final=False, log_every=10**9)
        train(d / "p", {"name": "ring8"}, net=RING_NET, config=cfg)
        steps = max(200, int(budget * 200 / (time.perf_counter() - t0)))
    out = []
    for i, (weighting, sampling, *rng) in enumerate(SCHEMES):
        if schemes is not None and i not in schemes:
            continue
        lam_min, lam_max = rng or (-12.0, 12.0)
        for seed in seeds:
            cfg = TrainConfig(
                lam_min=lam_min,
                lam_max=lam_max,
                steps=steps,
                batch_size=512,
                lr=4e-3,
                weighting=weighting,
                lam_sampling=sampling,
                seed=seed,
                eval_n=eval_n,
                eval_n_t=32,
                log_every=10**9,
                checkpoint_every=10**9,
            )
            res = train(
                d / f"{weighting}-{sampling}-{lam_max}-{seed}",
                {"name": "ring8", "seed": seed},
                net=RING_NET,
                config=cfg,
            )
            ev = res.final_eval
            out.append(
                _emit(
                    {
                        "part": "a",
                        "weighting": weighting,
                        "lam_sampling": sampling,
                        "lam_range": [lam_min, lam_max],
                        "seed": seed,
                        "steps": steps,
                        "seconds": round(res.seconds, 1),
                        "nll": ev["nll"],
                        "true_nll": ev["true_nll"],
                        "gap": ev["gap"],
                        "gap_stderr": ev["gap_stderr"],
                    }
                )
            )
    shutil.rmtree(d, ignore_errors=True)
    return out


def _sklearn_gmm_bpd(ds, seed: int) -> dict:
    """Best held-out bits/dim of sklearn's GaussianMixture on the dequantised digits (same split, same scale)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    g = torch.Generator().manual_seed(seed)
    xtr = ds.to_model(ds.x_train, generator=g).flatten(1).double().numpy()
    xte = ds.to_model(ds.x_test, generator=torch.Generator().manual_seed(seed + 9_999_991)).flatten(1)
    xte = xte.double().numpy()
    best = None
    rows = []
    for cov in ("diag", "full"):
        for k in (1, 8, 16, 32, 64, 128):
            if k > len(xtr) // 4:
                continue
            m = SkGMM(n_components=k, covariance_type=cov, random_state=seed, reg_covar=1e-4, max_iter=200).fit(xtr)
            nll = torch.from_numpy(-m.score_samples(xte))
            bpd = float(ds.bits_per_dim(nll, torch.from_numpy(xte)).mean())  # logit Jacobian included
            rows.append({"covariance": cov, "n_components": k, "logit": ds.logit_alpha is not None, "bpd": bpd})
            if best is None or bpd < best["bpd"]:
                best = rows[-1]
    return {"best": best, "all": rows}


def part_b(steps: int, seed: int, net: str, logit: bool = False) -> list[dict]:
    """digits: diffusion model bits/dim against sklearn's GaussianMixture on the same dequantised split
    (the mixture fitted both on the [-1, 1] scale and after the same logit transform; best of each)."""
    refs = {}
    for lg in (False, True):
        dsl = load_dataset("digits", seed=seed, test_fraction=0.2, logit=lg)
        refs[lg] = _sklearn_gmm_bpd(dsl, seed)
        _emit({"part": "b", "model": "sklearn GaussianMixture", **refs[lg]["best"], "grid": refs[lg]["all"]})
    if steps <= 0:
        return []
    ds = load_dataset("digits", seed=seed, test_fraction=0.2, logit=logit)
    ref = {"best": min((r["best"] for r in refs.values()), key=lambda r: r["bpd"])}
    d = _tmp()
    netcfg = {"type": "mlp", "hidden": 512, "blocks": 4, "emb_dim": 128} if net == "mlp" else {"type": "unet"}
    cfg = TrainConfig(
        steps=steps,
        batch_size=128,
        lr=1e-3,
        seed=seed,
        eval_n=len(ds.x_test),
        eval_n_t=32,
        eval_every=max(steps // 4, 1),
        weight_decay=0.0,
        ema_decay=0.999,
        log_every=10**9,
        checkpoint_every=10**9,
    )
    data = {"name": "digits", "seed": seed, "test_fraction": 0.2, "logit": logit}
    res = train(d / "digits", data, net=netcfg, config=cfg)
    evals = [h["eval"] for h in res.history if "eval" in h]
    out = [
        _emit(
            {
                "part": "b",
                "model": f"diffusion {net} ({cfg.weighting}, {cfg.lam_sampling}{', logit' if logit else ''})",
                "steps": steps,
                "seconds": round(res.seconds, 1),
                "bpd": res.final_eval["bpd"],
                "bpd_stderr": res.final_eval["bpd_stderr"],
                "bpd_during_training": [e["bpd"] for e in evals],
                "reference_bpd": ref["best"]["bpd"],
                "uniform_bpd": math.log2(17),
            }
        )
    ]
    shutil.rmtree(d, ignore_errors=True)
    return out


def _reference_loop(net_cfg: dict, x: torch.Tensor, steps: int, batch: int, lam_min: float, lam_max: float) -> float:
    """A plain training loop for the same network and loss: uniform log-SNR, Adam, no extras. Returns steps/s."""
    torch.manual_seed(0)
    model = build_denoiser(net_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb = x[torch.randint(0, len(x), (batch,))]
        lam = lam_min + (lam_max - lam_min) * torch.rand(batch, dtype=torch.float64)
        t = torch.sigmoid(-lam)
        z = torch.randn_like(xb)
        x_t = (torch.sigmoid(lam).sqrt()[:, None] * xb + t.sqrt()[:, None] * z).float()
        loss = 0.5 * (lam_max - lam_min) * (z - model(x_t, t)).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def part_c(steps: int) -> list[dict]:
    """Steps per second: the trainer against the plain reference loop, same network and batch."""
    ds = load_dataset("ring8")
    out = []
    for hidden, batch in ((128, 512), (512, 256)):
        net = dict(RING_NET, hidden=hidden)
        net_cfg = denoiser_config([2], "mlp", **{k: v for k, v in net.items() if k != "type"})
        net_cfg.update(data_std=data_std(ds), num_classes=0)
        ref = _reference_loop(net_cfg, ds.x_train, steps, batch, -12.0, 12.0)
        d = _tmp()
        cfg = TrainConfig(steps=steps, batch_size=batch, eval_final=False, log_every=50, checkpoint_every=10**9)
        res = train(d / "c", {"name": "ring8"}, net=net, config=cfg)
        shutil.rmtree(d, ignore_errors=True)
        out.append(
            _emit(
                {
                    "part": "c",
                    "hidden": hidden,
                    "batch": batch,
                    "steps": steps,
                    "trainer_steps_per_s": round(res.steps_per_second, 1),
                    "reference_steps_per_s": round(ref, 1),
                    "ratio": round(res.steps_per_second / ref, 3),
                }
            )
        )
    # the keyed (Philox) noise on its own, per step of the larger batch
    t0 = time.perf_counter()
    for s in range(200):
        keyed_normals(0, s, torch.arange(256), (2,))
    out.append(_emit({"part": "c", "keyed_noise_ms_per_step": round((time.perf_counter() - t0) / 200 * 1e3, 3)}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["a", "b", "c", "all"], default="all")
    p.add_argument("--budget", type=float, default=None, help="(a) wall-clock seconds per run (sets the steps)")
    p.add_argument("--steps-a", type=int, default=1200, help="(a) steps per run when no --budget (default 1200)")
    p.add_argument("--seeds", type=str, default="0,1", help="(a) comma-separated seeds")
    p.add_argument("--eval-n", type=int, default=2000, help="(a) held-out points")
    p.add_argument("--schemes", type=str, default=None, help="(a) comma-separated indices into SCHEMES (default all)")
    p.add_argument("--steps", type=int, default=4000, help="(b) training steps on digits")
    p.add_argument("--net", choices=["mlp", "unet"], default="mlp", help="(b) network")
    p.add_argument("--logit", action="store_true", help="(b) logit transform (alpha = 0.05) before the model")
    p.add_argument("--speed-steps", type=int, default=300, help="(c) steps per timing")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.part in ("a", "all"):
        schemes = None if args.schemes is None else [int(i) for i in args.schemes.split(",")]
        rows = part_a(args.budget, args.steps_a, seeds, args.eval_n, schemes)
        print("\n| weighting | lam sampling | lam range | steps | bound - exact (nats), one per seed |")
        print("|---|---|---|---|---|")
        for w, s, *rng in SCHEMES:
            rg = list(rng or (-12.0, 12.0))
            r = [x for x in rows if x["weighting"] == w and x["lam_sampling"] == s and x["lam_range"] == rg]
            if not r:
                continue
            gaps = ", ".join(f"{x['gap']:.3f} ± {x['gap_stderr']:.3f}" for x in r)
            print(f"| {w} | {s} | [{rg[0]:g}, {rg[1]:g}] | {r[0]['steps']} | {gaps} |")
    if args.part in ("b", "all"):
        part_b(args.steps, 0, args.net, args.logit)
    if args.part in ("c", "all"):
        part_c(args.speed_steps)


if __name__ == "__main__":
    main()
