"""Stock diffusers models (tiny configs, built here, nothing downloaded) saved to a temporary directory and loaded
by ``Teacher.from_pretrained``; the adapter against hand-converted wrappers written from the formulas."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tests.adapters.diffusers_models import load_dit, load_unet  # noqa: E402
from ttfm_kernels.adapters import Teacher  # noqa: E402

DTYPE = torch.float64
B = 3


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


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_written_out_schedules_are_diffusers_own(name):
    from tests.adapters.gaussian_models import schedule
    stable_diffusion = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    theirs = diffusers.DDPMScheduler(beta_schedule=name, **stable_diffusion).alphas_cumprod
    torch.testing.assert_close(schedule(name).float(), theirs, rtol=1e-5, atol=1e-7)
    teacher = Teacher(torch.nn.Identity(), "v_prediction", alphas_cumprod=theirs)
    assert teacher.t_range == pytest.approx(Teacher(torch.nn.Identity(), "v_prediction",
                                                    alphas_cumprod=schedule(name)).t_range, rel=1e-4)
