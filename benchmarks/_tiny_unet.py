"""The small random diffusers U-Net shared by the benchmarks (the architecture of the tests' ``tiny_unet``).

Imported by benchmark scripts run as ``python benchmarks/NAME.py`` (this folder is then on ``sys.path``).
"""

from __future__ import annotations

import torch


def perturbed_tiny_unet():
    """A 1-channel 8x8 ``UNet2DModel`` (block widths 8, 16), weights drawn with ``torch.manual_seed(0)`` plus
    0.05 N(0, 1) on every weight (diffusers zero-inits some layers), in eval mode with frozen parameters."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval().requires_grad_(False)
