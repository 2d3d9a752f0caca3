"""Keyed randomness: every random draw of the library, as a pure function of a key.

All estimators, the trainer, dequantisation, Hutchinson probes and pilots draw through this module. A draw is
keyed by ``(seed, stream, step, example index, position)`` and computed with the counter-based Philox4x32-10
generator (Salmon et al. 2011, Random123) in batched integer tensor ops on the requested device. Consequences:

* an example's draws never depend on the other examples, so results do not depend on batch, chunk or shard
  boundaries (pass global example ids);
* the uniforms are bit-identical on every device (integer arithmetic only); normals go through float64
  Box-Muller, equal across devices to the last ulp of ``log``/``cos``/``sin``;
* resuming needs no generator state: the key is enough.

``step`` is a second counter: the training step, or the round / replicate of an estimator that draws the same
example several times (e.g. ``evaluate --target-se`` rounds). Streams are named in :class:`Stream`; a new kind of
draw gets a new name, never a reused number.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

__all__ = ["Stream", "philox4x32", "uniforms", "normals", "rademacher", "example_keys"]

_M32 = 0xFFFFFFFF


class Stream(enum.IntEnum):
    """Named random streams (16-bit numbers; the training ones keep their historical numbers)."""

    TRAIN_LAM = 0  # per-example log-SNR of a training step
    TRAIN_NOISE = 1  # per-example z of a training step
    TRAIN_LAM_SHARED = 2  # the shared offset of the low-discrepancy log-SNR sampler
    TRAIN_LABEL_DROP = 3  # classifier-free label dropout
    TRAIN_DEQUANT = 4  # dequantisation noise of discrete training data
    CLASSIFIER_LAM = 10  # diffusion classifier: common log-SNR across classes
    CLASSIFIER_NOISE = 11  # diffusion classifier: common z across classes
    FORMULA_LAM = 20  # density formula: log-SNR nodes
    FORMULA_NOISE = 21  # density formula: z at each node
    FORMULA_PILOT = 22  # density formula: pilot draws of the adaptive proposal
    DECODER_NOISE = 23  # discretised decoder: z at the clean end
    ELBO_LAM = 24  # divergence ELBO: log-SNR nodes
    ELBO_PROBE = 25  # divergence ELBO: Hutchinson probes
    ELBO_PILOT = 26  # divergence ELBO: pilot draws
    ODE_PROBE = 27  # probability-flow ODE: Hutchinson probes
    DDPM_STEPS = 28  # DDPM ELBO: which steps are sampled
    DDPM_NOISE = 29  # DDPM ELBO: z at each step
    DDPM_PILOT = 30  # DDPM ELBO: pilot of the step proposal
    DEQUANT = 31  # dequantisation noise of evaluated data
    ELBO_NOISE = 32  # divergence ELBO: z at each node
    GAN_LAM = 40  # GAN score regulariser: log-SNR of each (sample, draw)
    GAN_NOISE = 41  # GAN score regulariser: z of each (sample, draw)
    GAN_LATENT = 42  # GAN: generator inputs w (training steps and sampling)
    GAN_DATA = 43  # GAN training: mixture component of each real sample
    GAN_DATA_NOISE = 44  # GAN training: Gaussian part of each real sample
    CLASSIFIER_CHECK = 45  # diffusion classifier: the probe that refuses an unconditional model
    DIFFLOSS_LAM = 46  # diffusion-loss head: log-SNR of each (token, draw) of a loss evaluation
    DIFFLOSS_NOISE = 47  # diffusion-loss head: z of each (token, draw) of a loss evaluation
    CERTIFY_NODES = 48  # certify: step 0 the chunk order, step 1 each chunk's nodes, step 2 + k minibatch of step k
    CERTIFY_NOISE = 49  # certify objectives: z of each (example, node, draw)


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]) -> tuple[Tensor, ...]:
    """Philox4x32-10 counter-based generator (Salmon et al. 2011, Random123), vectorised.

    Args:
        counter: four int64 tensors of equal shape holding uint32 values (any device).
        key: two uint32 ints.

    Returns:
        Four int64 tensors of uint32 random words (same shape and device as the counter).
    """
    c0, c1, c2, c3 = (c & _M32 for c in counter)
    k0, k1 = key[0] & _M32, key[1] & _M32
    for _ in range(10):
        p0 = c0 * 0xD2511F53  # wraps in int64; the low 64 bits are exact
        p1 = c2 * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & _M32, p0 & _M32
        hi1, lo1 = (p1 >> 32) & _M32, p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def _int_device(device: torch.device | str | None) -> torch.device:
    """Where the integer and float64 work runs: the requested device, except MPS (no float64) -> CPU."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    return torch.device("cpu") if dev.type == "mps" else dev


def _words(seed: int, stream: int, step: int, index: Tensor, n_words: int, device: torch.device) -> Tensor:
    """[B, n_words] int64 uint32 words keyed by (seed, stream, step, index[b], word position)."""
    if not 0 <= int(stream) < 1 << 16:
        raise ValueError(f"stream must be in [0, 65536), got {stream}")
    if n_words > 4 * (1 << 24):
        raise ValueError(f"at most {4 << 24} random words per (example, stream, step), asked for {n_words}")
    index = torch.as_tensor(index, dtype=torch.int64).to(device).flatten()
    n_calls = (n_words + 3) // 4
    shape = (index.shape[0], n_calls)
    j = torch.arange(n_calls, dtype=torch.int64, device=device)
    step = int(step)
    c0 = (index[:, None] & _M32).expand(shape)
    c1 = ((index[:, None] >> 32) & 0xFFFF).expand(shape) | ((int(stream) & 0xFFFF) << 16)
    c2 = torch.full(shape, step & _M32, dtype=torch.int64, device=device)
    c3 = j[None].expand(shape) | ((step >> 32) & 0xFF) << 24
    key = (int(seed) & _M32, (int(seed) >> 32) & _M32)
    out = torch.stack(philox4x32((c0, c1, c2, c3), key), dim=2)  # [B, n_calls, 4]
    return out.reshape(shape[0], -1)[:, :n_words]


def uniforms(
    seed: int, stream: int, index: Tensor, n: int, *, step: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Uniforms in the open interval (0, 1): [B, n] float64 with 53 random bits.

    Row ``b`` is a pure function of ``(seed, stream, step, index[b])``; its first ``m`` values do not depend
    on ``n`` (a prefix of a longer draw). ``device``: where to compute and return (default CPU).
    """
    dev = _int_device(device)
    w = _words(seed, stream, step, index, 2 * n, dev).reshape(-1, n, 2).to(torch.float64)
    hi = torch.floor(w[..., 0] / 32)  # 27 bits
    lo = torch.floor(w[..., 1] / 64)  # 26 bits
    return (hi * 67108864.0 + lo + 0.5) / 9007199254740992.0  # on MPS: float64 stays on the CPU


def normals(
    seed: int,
    stream: int,
    index: Tensor,
    shape: tuple[int, ...],
    *,
    step: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normals [B, *shape] float64 keyed like :func:`uniforms` (Box-Muller on pairs of uniforms)."""
    shape = tuple(int(s) for s in shape)
    d = math.prod(shape)
    m = (d + 1) // 2
    u = uniforms(seed, stream, index, 2 * m, step=step, device=_int_device(device)).reshape(-1, m, 2)
    r = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    ang = (2 * math.pi) * u[..., 1]
    z = torch.stack([r * ang.cos(), r * ang.sin()], dim=2).reshape(-1, 2 * m)[:, :d]
    return z.reshape(-1, *shape)


def rademacher(
    seed: int,
    stream: int,
    index: Tensor,
    shape: tuple[int, ...],
    *,
    step: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random signs ±1 [B, *shape] float64 keyed like :func:`uniforms` (one word per sign)."""
    shape = tuple(int(s) for s in shape)
    d = math.prod(shape)
    w = _words(seed, stream, step, index, d, _int_device(device))
    return ((w & 1).to(torch.float64) * 2 - 1).reshape(-1, *shape)


def example_keys(example_ids: Tensor | None, b: int, device: torch.device | str | None = None) -> Tensor:
    """[b] int64 keys of the examples' random streams: ``example_ids`` checked, or ``0..b-1``.

    Raises:
        ValueError: if ``example_ids`` does not hold one integer per example.
    """
    if example_ids is None:
        return torch.arange(b, dtype=torch.int64, device=_int_device(device))
    keys = torch.as_tensor(example_ids)
    if keys.dtype.is_floating_point or keys.dtype == torch.bool:
        raise ValueError(f"example_ids must be integers, got dtype {keys.dtype}")
    keys = keys.to(torch.int64).flatten()
    if keys.shape != (b,):
        raise ValueError(f"example_ids must have one entry per example ({b}), got shape {tuple(keys.shape)}")
    return keys.to(_int_device(device))
