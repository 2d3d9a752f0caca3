"""End terms are computed on the data's device: no CPU tensor is created (no host-device copies or syncs)."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scoredensity.decoders import LOG_2PI_E, end_terms, prior_kl


class _Devices(TorchDispatchMode):
    """Records the device of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self.seen.append((str(func), o.device.type))
        return out


def test_end_terms_make_no_cpu_tensor():
    x = torch.empty(3, 2, 2, device="meta")
    with _Devices() as rec:
        noisy, clean = end_terms(x, -20.0, 20.0)
    assert rec.seen and all(dev == "meta" for _, dev in rec.seen), [s for s in rec.seen if s[1] != "meta"]
    assert noisy.device.type == clean.device.type == "meta" and noisy.shape == (3,)


def test_end_terms_values_unchanged():
    # against the closed forms: noisy = -KL(N(a x, t) || N(0, 1)) + (d/2) softplus(lam_min), clean constant
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for lo, hi in [(-20.0, 20.0), (-3.0, 5.0), (-40.0, 1.5)]:
        noisy, clean = end_terms(x, lo, hi)
        log_t, log_a2 = -math.log1p(math.exp(lo)), lo - math.log1p(math.exp(lo))  # t = sigmoid(-lo), a^2 = 1 - t
        kl = 0.5 * (math.exp(log_a2) * (x.pow(2).sum(1) - 3) - 3 * log_t)
        assert torch.allclose(noisy, -kl + 1.5 * math.log1p(math.exp(lo)), atol=1e-12, rtol=0)
        want_clean = -1.5 * (LOG_2PI_E + math.log1p(math.exp(-hi)))
        assert torch.allclose(clean, torch.full((4,), want_clean, dtype=torch.float64), atol=1e-12)
        kl_t = prior_kl(x, torch.tensor(log_t), torch.tensor(log_a2))  # tensor ends still work
        assert torch.allclose(kl_t, kl, atol=1e-12)
