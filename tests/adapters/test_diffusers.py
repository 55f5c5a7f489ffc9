"""Stock diffusers models (tiny configs, built here, nothing downloaded) saved to a temporary directory and loaded
by ``Teacher.from_pretrained``; the adapter against hand-converted wrappers written from the formulas."""

import numpy as np
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from ttfm_kernels.adapters import Teacher  # noqa: E402

DTYPE = torch.float64
B = 3


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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny UNet2DModel with a DDPM (epsilon, linear betas) scheduler and a tiny DiTTransformer2DModel with a
    flow-matching scheduler, saved with save_pretrained; returns the directories."""
    root = tmp_path_factory.mktemp("diffusers")
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


def load_unet(saved) -> tuple[Teacher, HandEpsilon]:
    teacher = Teacher.from_pretrained(saved / "unet", scheduler_dir=saved / "ddpm").double()
    scheduler = diffusers.DDPMScheduler.from_pretrained(saved / "ddpm")
    return teacher, HandEpsilon(teacher.model, scheduler.alphas_cumprod)


def load_dit(saved) -> tuple[Teacher, HandFlow]:
    teacher = Teacher.from_pretrained(saved / "dit", prediction="flow", scheduler_dir=saved / "flow").double()
    return teacher, HandFlow(teacher.model)


def test_unet_with_ddpm_scheduler_loads_as_an_epsilon_teacher(saved):
    teacher, hand = load_unet(saved)
    assert teacher.prediction == "epsilon" and not teacher.model.training
    assert isinstance(teacher.model, diffusers.UNet2DModel)
    assert teacher.t_range == pytest.approx((0.0063, 0.990), rel=0.02)
    x = torch.randn(B, 3, 8, 8, dtype=DTYPE)
    t = torch.tensor([teacher.t_range[0], 0.5, teacher.t_range[1]], dtype=DTYPE)
    with torch.no_grad():
        v = teacher(x, t)
        torch.testing.assert_close(v, hand(x, t), rtol=1e-10, atol=1e-10)
    assert v.abs().mean() > 0.1


def test_dit_with_flow_scheduler_loads_as_a_flow_teacher(saved):
    teacher, hand = load_dit(saved)
    assert teacher.prediction == "flow" and teacher.t_range == (0.0, 1.0) and teacher.timestep_scale == 1000.0
    x, t, y = torch.randn(B, 3, 8, 8, dtype=DTYPE), torch.rand(B, dtype=DTYPE), torch.tensor([0, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t, class_labels=y), hand(x, t, y), rtol=1e-12, atol=1e-12)


def test_from_pretrained_errors_are_named(saved, tmp_path):
    with pytest.raises(ValueError, match="scheduler in"):
        Teacher.from_pretrained(saved / "unet", prediction="sample", scheduler_dir=saved / "ddpm")
    with pytest.raises(ValueError, match="pass scheduler_dir"):
        Teacher.from_pretrained(saved / "unet", prediction="epsilon")
    with pytest.raises(ValueError, match="pass prediction"):
        Teacher.from_pretrained(saved / "unet")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        Teacher.from_pretrained(tmp_path, prediction="flow")
    (tmp_path / "config.json").write_text('{"_class_name": "NoSuchModel"}')
    with pytest.raises(ValueError, match="NoSuchModel"):
        Teacher.from_pretrained(tmp_path, prediction="flow")
    teacher = Teacher.from_pretrained(saved / "unet", prediction="velocity")  # no scheduler: as stated
    assert teacher.prediction == "velocity"
