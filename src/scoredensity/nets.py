"""Denoiser networks in canonical time (docs/design.md §1).

Every network here is an ``nn.Module`` whose ``forward(x_t [B, *shape], t [B] float64, y=None)`` returns the
noise prediction ``eps [B, *shape]``, so a network *is* an :class:`~scoredensity.epsfn.EpsFn`.

* The time feature is the log-SNR ``lam = log((1 - t) / t)`` computed in float64 and scaled by ``1/8``
  before a fixed Fourier embedding (frequencies 1..64 over the scaled value), so the network sees the
  same feature whatever clock the data were noised on.
* Preconditioning (Karras et al. 2022, "EDM"): the input is scaled by ``c_in = 1 / sqrt((1-t) s^2 + t)``
  with ``s = data_std`` so it has unit variance at every noise level.
* Output (default ``param="v"``): the v-parameterisation ``eps = sqrt(t) x_t + sqrt(1-t) c_out F``,
  ``c_out = sqrt((1-t) + t s^2)`` (the std of the v-target ``sqrt(1-t) z - sqrt(t) x``), which has the
  right limit ``eps -> x_t`` as ``t -> 1``. ``param="eps"`` returns ``F`` directly.
* Class conditioning: ``num_classes > 0`` adds a label embedding with one extra *null* label
  (index ``num_classes``) used when ``y`` is ``None`` or dropped (classifier-free guidance style).

Configs are plain JSON-serialisable dicts; :func:`build_denoiser` recreates a network from one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .schedules import batch_expand

__all__ = [
    "MLPDenoiser",
    "UNetDenoiser",
    "build_denoiser",
    "denoiser_config",
    "eval_eps_fn",
    "TimeEmbedding",
    "AdaLNBlock",
    "edm_scalings",
    "v_output",
]

LAM_SCALE = 8.0  # log-SNR fed to the network as lam / LAM_SCALE


def edm_scalings(t: Tensor, data_std: float) -> tuple[Tensor, Tensor, Tensor]:
    """Log-SNR and the EDM input/output scalings of the module docstring, from canonical time.

    Args:
        t: [B] canonical time in (0, 1) (float64 preferred; a 0-d ``t`` is not expanded here).
        data_std: scalar data standard deviation ``s``.

    Returns:
        ``(lam, c_in, c_out)``, each [B] float64: ``lam = log((1 - t) / t)``, ``c_in = 1 / sqrt((1-t) s^2 + t)``,
        ``c_out = sqrt((1-t) + t s^2)`` (``1 - t`` and ``t`` taken as ``sigmoid(±lam)``, stable at both ends).
    """
    lam = torch.log1p(-t) - torch.log(t)
    s2 = float(data_std) ** 2
    a2, sg2 = torch.sigmoid(lam), torch.sigmoid(-lam)  # 1 - t, t
    return lam, torch.rsqrt(a2 * s2 + sg2), torch.sqrt(a2 + sg2 * s2)


def v_output(x_t: Tensor, out: Tensor, lam: Tensor, c_out: Tensor) -> Tensor:
    """The v-parameterisation ``eps = sqrt(t) x_t + sqrt(1-t) c_out F`` (right limit ``eps -> x_t`` as ``t -> 1``).

    Args:
        x_t: [B, *shape] noisy input. out: [B, *shape] network output ``F``. lam, c_out: [B] from
            :func:`edm_scalings`.

    Returns:
        [B, *shape] float64 noise prediction.
    """
    a = torch.sigmoid(lam).sqrt()
    return batch_expand(torch.sigmoid(-lam).sqrt(), x_t) * x_t.to(torch.float64) + batch_expand(
        a * c_out, x_t
    ) * out.to(torch.float64)


class TimeEmbedding(nn.Module):
    """Fixed Fourier features of the scaled log-SNR ``u = lam / 8``: ``[u, sin(pi f u), cos(pi f u)]``
    for ``n_freq`` frequencies ``f`` log-spaced on [1, 64], followed by a two-layer MLP.

    Args:
        out_dim: embedding width. n_freq: number of frequencies.
    """

    def __init__(self, out_dim: int, n_freq: int = 16):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.logspace(0, math.log10(64.0), n_freq), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq + 1, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, lam: Tensor) -> Tensor:
        """``lam`` [B] (any float dtype) -> [B, out_dim] float32."""
        u = (lam.to(torch.float64) / LAM_SCALE).clamp(-8.0, 8.0)
        arg = u[:, None] * self.freqs.to(torch.float64)[None]
        feats = torch.cat([u[:, None], arg.sin(), arg.cos()], 1).to(torch.float32)
        return self.mlp(feats)


class _ResBlock(nn.Module):
    """Pre-norm residual block with a FiLM (scale, shift) conditioning on the embedding."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        a = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(F.silu(self.fc1(F.silu(a))))


class AdaLNBlock(nn.Module):
    """``h + gate * MLP(LN(h) * (1 + scale) + shift)``; ``(shift, scale, gate)`` from the condition ``y`` (DiT's
    adaptive layer norm), the gate initialised at 0 so every block starts as the identity.

    Args:
        width: feature width of ``h`` and ``y``.
    """

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        """``h`` [N, width], ``y`` [N, width] -> [N, width]."""
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class _Denoiser(nn.Module):
    """Shared canonical-time wrapper: log-SNR, preconditioning and output parameterisation."""

    config: dict[str, Any]

    def _backbone(self, x_in: Tensor, lam: Tensor, y: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Noise prediction ``eps(x_t, t)`` [B, *shape] in ``x_t``'s dtype.

        Args:
            x_t: [B, *shape] noisy input. t: [B] canonical time in (0, 1), float64 preferred.
            y: [B] integer labels or ``None`` (null label) for class-conditional networks.
        """
        shape = tuple(self.config["shape"])
        if tuple(x_t.shape[1:]) != shape:
            raise ValueError(
                f"denoiser expects inputs of shape [B, {', '.join(map(str, shape))}], got {tuple(x_t.shape)}"
            )
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        lam, c_in, c_out = edm_scalings(t, float(self.config.get("data_std", 1.0)))  # [B] float64
        x32 = x_t.to(torch.float32)
        out = self._backbone(x32 * batch_expand(c_in, x32).to(torch.float32), lam, y)
        if self.config.get("param", "v") == "eps":
            return out.to(x_t.dtype)
        return v_output(x_t, out, lam, c_out).to(x_t.dtype)

    def _label_embedding(self, y: Tensor | None, batch: int, device) -> Tensor | None:
        k = int(self.config.get("num_classes", 0))
        if k <= 0:
            return None
        if y is None:
            y = torch.full((batch,), k, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device).long()
        if y.shape != (batch,) or (y < 0).any() or (y > k).any():
            raise ValueError(f"labels must be [B] integers in 0..{k} ({k} = null label)")
        return self.label_emb(y)


class MLPDenoiser(_Denoiser):
    """Residual MLP on flattened inputs, conditioned on the log-SNR (and optionally a class label).

    Args:
        shape: per-example shape (the MLP flattens it). hidden: width. blocks: residual blocks.
        emb_dim: time/label embedding width. num_classes: 0 for unconditional.
        param: ``"v"`` (default) or ``"eps"``. data_std: scalar data standard deviation for preconditioning.
    """

    def __init__(
        self,
        shape: tuple[int, ...] | list[int],
        hidden: int = 256,
        blocks: int = 3,
        emb_dim: int = 128,
        num_classes: int = 0,
        param: str = "v",
        data_std: float = 1.0,
    ):
        super().__init__()
        if param not in ("v", "eps"):
            raise ValueError(f"param must be 'v' or 'eps', got {param!r}")
        shape = [int(s) for s in shape]
        self.config = dict(
            type="mlp",
            shape=shape,
            hidden=int(hidden),
            blocks=int(blocks),
            emb_dim=int(emb_dim),
            num_classes=int(num_classes),
            param=param,
            data_std=float(data_std),
        )
        d = math.prod(shape)
        self.time_emb = TimeEmbedding(emb_dim)
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.inp = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList([_ResBlock(hidden, emb_dim) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _backbone(self, x_in: Tensor, lam: Tensor, y: Tensor | None) -> Tensor:
        b = x_in.shape[0]
        emb = self.time_emb(lam)
        lab = self._label_embedding(y, b, x_in.device)
        if lab is not None:
            emb = emb + lab
        emb = F.silu(emb)
        h = self.inp(x_in.flatten(1))
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(self.out_norm(h))).reshape(x_in.shape)


class UNetDenoiser(_Denoiser):
    """diffusers' ``UNet2DModel`` in canonical time, for images ``[B, C, H, W]``.

    The U-Net receives the continuous timestep ``1000 * t`` (float; diffusers' sinusoidal timestep
    embedding accepts any float, and ``1000 t`` matches the scale of its usual integer steps); with
    ``num_classes > 0`` the label goes through its ``class_embedding`` with a null label at index
    ``num_classes``. Output parameterisation and preconditioning as in the module docstring.

    Args:
        shape: ``[C, H, W]`` (H and W divisible by ``2 ** (len(channels) - 1)``).
        channels: ``block_out_channels``. layers_per_block: residual layers per resolution.
        attention: add self-attention at the lowest resolution.
    """

    def __init__(
        self,
        shape: tuple[int, ...] | list[int],
        channels: tuple[int, ...] | list[int] = (32, 64),
        layers_per_block: int = 1,
        attention: bool = False,
        num_classes: int = 0,
        param: str = "v",
        data_std: float = 1.0,
    ):
        super().__init__()
        from diffusers import UNet2DModel  # a core dependency, imported here because it is slow to import

        if param not in ("v", "eps"):
            raise ValueError(f"param must be 'v' or 'eps', got {param!r}")
        shape = [int(s) for s in shape]
        if len(shape) != 3:
            raise ValueError(f"the U-Net needs image data [C, H, W], got per-example shape {shape}")
        channels = [int(c) for c in channels]
        f = 2 ** (len(channels) - 1)
        if shape[1] % f or shape[2] % f:
            raise ValueError(f"image size {shape[1:]} must be divisible by {f} for {len(channels)} resolutions")
        self.config = dict(
            type="unet",
            shape=shape,
            channels=channels,
            layers_per_block=int(layers_per_block),
            attention=bool(attention),
            num_classes=int(num_classes),
            param=param,
            data_std=float(data_std),
        )
        n = len(channels)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if attention:
            down[-1] = "AttnDownBlock2D"
            up[0] = "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=shape[1],
            in_channels=shape[0],
            out_channels=shape[0],
            block_out_channels=tuple(channels),
            layers_per_block=int(layers_per_block),
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=min(8, channels[0]),
            num_class_embeds=(num_classes + 1) if num_classes > 0 else None,
        )

    def _backbone(self, x_in: Tensor, lam: Tensor, y: Tensor | None) -> Tensor:
        t = torch.sigmoid(-lam).to(torch.float32) * 1000.0
        labels = None
        k = self.config["num_classes"]
        if k > 0:
            labels = torch.full((x_in.shape[0],), k, dtype=torch.long) if y is None else torch.as_tensor(y).long()
        return self.unet(x_in, t, class_labels=labels).sample


def build_denoiser(config: dict[str, Any]) -> _Denoiser:
    """Recreate a denoiser from its ``config`` dict (as stored in checkpoints).

    Raises:
        ValueError: for an unknown ``type`` or bad options.
    """
    config = dict(config)
    kind = config.pop("type", "mlp")
    if kind == "mlp":
        return MLPDenoiser(**config)
    if kind == "unet":
        return UNetDenoiser(**config)
    raise ValueError(f"unknown denoiser type {kind!r}; choose 'mlp' or 'unet'")


def denoiser_config(shape: tuple[int, ...] | list[int], net: str = "auto", **overrides: Any) -> dict[str, Any]:
    """A default config for data of per-example ``shape``: ``net="auto"`` picks the MLP for vectors and
    the U-Net for images ``[C, H, W]`` with H, W divisible by 2. ``overrides`` replace defaults."""
    shape = [int(s) for s in shape]
    if net == "auto":
        net = "unet" if len(shape) == 3 and shape[1] % 2 == 0 and shape[2] % 2 == 0 else "mlp"
    if net == "mlp":
        cfg: dict[str, Any] = dict(type="mlp", shape=shape, hidden=256, blocks=3, emb_dim=128)
    elif net == "unet":
        cfg = dict(type="unet", shape=shape, channels=[32, 64], layers_per_block=1)
    else:
        raise ValueError(f"unknown net {net!r}; choose 'auto', 'mlp' or 'unet'")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def eval_eps_fn(model: nn.Module, y: Tensor | None = None):
    """An :class:`~scoredensity.epsfn.EpsFn` that calls ``model`` without building a parameter graph
    (gradients with respect to ``x_t`` still flow, for estimators that need them)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return model(x_t, t, y)

    return eps_fn
