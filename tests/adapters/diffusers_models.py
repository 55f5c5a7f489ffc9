"""Stock diffusers models in tiny configs (built here, nothing downloaded) and hand-converted wrappers of them,
written from the formulas of docs/math.md ("Adapted teachers") without the adapter's code. Import only after
``pytest.importorskip("diffusers")``."""

from pathlib import Path

import diffusers
import numpy as np
import torch
from torch import nn

from ttfm_kernels.adapters import Teacher


class HandEpsilon(nn.Module):
    """v(x, t) of an epsilon-prediction diffusers model, written out: tau by np.interp of the table's library
    times, x_tau = x (alpha + sigma_v), v = (x - eps_hat) / t."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        abar = alphas_cumprod.double().numpy()
        self.table = (np.sqrt(abar) / (np.sqrt(abar) + np.sqrt(1 - abar)))[::-1].copy()  # ascending

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = len(self.table)
        tau = torch.from_numpy(np.interp(t.detach().double().numpy(), self.table, np.arange(n)[::-1].astype(float)))
        alpha, sigma_v = (v / (t**2 + (1 - t) ** 2).sqrt() for v in (t, 1 - t))
        eps = self.unet(x * (alpha + sigma_v)[:, None, None, None], tau.to(t)).sample
        return (x - eps) / t[:, None, None, None]


class HandFlow(nn.Module):
    """v(x, t, y) of a diffusers flow-matching model, written out: -model(x, 1000 (1 - t), class_labels=y)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return -self.dit(x, 1000 * (1 - t), class_labels=class_labels).sample


def save_tiny_models(root: Path) -> Path:
    """A tiny UNet2DModel with a DDPM (epsilon, linear betas) scheduler and a tiny DiTTransformer2DModel with a
    flow-matching scheduler, saved with save_pretrained under ``root``; returns root."""
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                          attention_head_dim=8).save_pretrained(root / "unet")
    diffusers.DDPMScheduler(beta_schedule="linear", prediction_type="epsilon").save_pretrained(root / "ddpm")
    diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, num_layers=1,
                                    sample_size=8, patch_size=2, num_embeds_ada_norm=4,
                                    norm_num_groups=1).save_pretrained(root / "dit")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "flow")
    return root


def load_unet(saved: Path) -> tuple[Teacher, HandEpsilon]:
    """The saved UNet as an adapted teacher (float64), and its hand-converted twin sharing the same model."""
    teacher = Teacher.from_pretrained(saved / "unet", scheduler_dir=saved / "ddpm").double()
    scheduler = diffusers.DDPMScheduler.from_pretrained(saved / "ddpm")
    return teacher, HandEpsilon(teacher.model, scheduler.alphas_cumprod)


def load_dit(saved: Path) -> tuple[Teacher, HandFlow]:
    """The saved DiT as an adapted flow teacher (float64), and its hand-converted twin."""
    teacher = Teacher.from_pretrained(saved / "dit", prediction="flow", scheduler_dir=saved / "flow").double()
    return teacher, HandFlow(teacher.model)
