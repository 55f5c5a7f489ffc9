"""GuidedTeacher matches v(x, t, null) + w (v(x, t, c) - v(x, t, null)) and keeps the teacher's sigma."""

import torch

from tests.flow_models import DTYPE, VelocityNet
from ttfm_kernels import GuidedTeacher


def test_guided_teacher_matches_its_formula():
    teacher = VelocityNet(3, sigma=0.5)
    guided = GuidedTeacher(teacher, 3.0, {"y": torch.tensor([3])})
    x, t, y = torch.randn(4, 3, dtype=DTYPE), torch.rand(4, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    v_null, v_c = teacher(x, t, y=torch.full((4,), 3)), teacher(x, t, y=y)
    torch.testing.assert_close(guided(x, t, y=y), v_null + 3.0 * (v_c - v_null))
    assert guided.sigma == 0.5
    torch.testing.assert_close(GuidedTeacher(teacher, 1.0, {"y": torch.tensor(3)})(x, t, y=y), v_c)
