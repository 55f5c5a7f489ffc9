"""Two-time students from stock diffusers models (tiny configs, nothing downloaded): bitwise equal to the teacher at
initialisation for every known class and the generic hook; the (t - s) embedding reaches every use of the time
embedding (checked against parameter surgery on a copy of the teacher); jvp_t against the double-backward JVP;
loss steps against a hand-built wrapper; state_dict and save_pretrained / load_two_time round trips."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ttfm_kernels import EMA, emd_loss, itvm_loss, jvp_t, lfmd_loss
from ttfm_kernels.adapters import Teacher, TwoTimeStudent, load_two_time, two_time

diffusers = pytest.importorskip("diffusers")

from tests.adapters.diffusers_models import load_unet  # noqa: E402

DTYPE = torch.float64
B = 3


@pytest.fixture(autouse=True)
def _quiet_and_one_thread():
    """One thread (tiny convolutions spin on 2 loaded threads); float64 attention takes the reference backend
    (its one warning is expected here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not support torch.float64")
        yield
    torch.set_num_threads(threads)


class SD3Call(nn.Module):
    """An SD3 transformer behind the ``model(x, timestep, **cond)`` calling convention of ``Teacher``."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections).sample


class Custom(nn.Module):
    """A model of no known class: its time embedding is the submodule ``embed``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
        self.conv_in, self.conv_out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + self.embed(timestep[:, None] / 1000)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


def _teacher(kind: str, saved) -> tuple[Teacher, dict[str, torch.Tensor], tuple[int, ...]]:
    """The teacher of ``kind`` (float64), its conditioning and its sample shape."""
    torch.manual_seed(0)
    if kind == "unet":
        return load_unet(saved)[0], {}, (3, 8, 8)
    if kind == "dit":  # two blocks: three uses of a time embedding (the output layer reuses block 0's)
        model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3,
                                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4,
                                                norm_num_groups=1)
        return Teacher(model.to(DTYPE).eval(), "flow"), {"class_labels": torch.tensor([0, 2, 3])}, (3, 8, 8)
    if kind == "cond_unet":
        model = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            cross_attention_dim=12, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
        cond = {"encoder_hidden_states": torch.randn(B, 5, 12, dtype=DTYPE)}
        return Teacher(model.to(DTYPE).eval(), "velocity"), cond, (4, 8, 8)
    if kind == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
            pos_embed_max_size=8)
        cond = {"encoder_hidden_states": torch.randn(B, 5, 12, dtype=DTYPE),
                "pooled_projections": torch.randn(B, 6, dtype=DTYPE)}
        return Teacher(SD3Call(model.to(DTYPE)).eval(), "flow"), cond, (4, 8, 8)
    return Teacher(Custom().to(DTYPE), "velocity"), {}, (3, 8, 8)


def _student(teacher: Teacher, kind: str) -> TwoTimeStudent:
    return two_time(teacher, time_embedding="embed" if kind == "custom" else None)


def _times(teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """s = t, a gap, and t = t_max."""
    lo, hi = teacher.t_range
    return torch.tensor([0.4, lo, 0.7], dtype=DTYPE), torch.tensor([0.4, 0.5, hi], dtype=DTYPE)


def _perturb(student: TwoTimeStudent) -> None:
    with torch.no_grad():
        for p in student.delta_embedding.parameters():
            p.add_(0.3 * torch.randn_like(p))


KINDS = ["unet", "cond_unet", "dit", "sd3", "custom"]


@pytest.mark.parametrize("kind", KINDS)
def test_student_equals_teacher_bitwise_at_init(saved, kind):
    teacher, cond, shape = _teacher(kind, saved)
    student = _student(teacher, kind)
    if kind == "dit":
        assert list(student.sites) == [f"transformer_blocks.{i}.norm1.emb"
                                       for i in range(len(teacher.model.transformer_blocks))]
    else:
        assert list(student.sites) == [{"sd3": "transformer.time_text_embed", "custom": "embed"}.get(
            kind, "time_embedding")]
    assert student.t_range == teacher.t_range and student.sigma == 1.0 and student.model is not teacher.model
    assert all(p.requires_grad for p in student.parameters())
    x = torch.randn(B, *shape, dtype=DTYPE)
    s, t = _times(teacher)
    with torch.no_grad():
        v = teacher(x, s, **cond)
        assert torch.equal(student(x, s, t, **cond), v)
        assert torch.equal(student(x, s, torch.full_like(t, teacher.t_range[1]), **cond), v)
    assert v.abs().mean() > 1e-3


def _surgery(teacher: Teacher, kind: str, delta: torch.Tensor) -> Teacher:
    """A copy of the teacher whose time embeddings' bias gets ``delta`` (D,): equal to adding it to the output
    of every time-embedding call, written without the adapter's hooks."""
    out = copy.deepcopy(teacher)
    model = out.model
    if kind in ("unet", "cond_unet"):
        linears = [model.time_embedding.linear_2]
    elif kind == "dit":
        linears = [block.norm1.emb.timestep_embedder.linear_2 for block in model.transformer_blocks]
    elif kind == "sd3":
        linears = [model.transformer.time_text_embed.timestep_embedder.linear_2]
    else:
        linears = [model.embed[2]]
    with torch.no_grad():
        for linear in linears:
            linear.bias.add_(delta)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_embedding_reaches_every_use_of_the_time_embedding(saved, kind):
    teacher, cond, shape = _teacher(kind, saved)
    student = _student(teacher, kind)
    _perturb(student)
    x = torch.randn(B, *shape, dtype=DTYPE)
    s = torch.tensor([0.25, 0.5, 0.125], dtype=DTYPE)
    t = s + 0.25  # one gap for the whole batch (exact in binary): one delta row, as a bias
    with torch.no_grad():
        delta = student.delta_embedding(t - s)
        assert torch.equal(delta[0], delta[1]) and delta.abs().mean() > 0.01
        u = student(x, s, t, **cond)
        torch.testing.assert_close(u, _surgery(teacher, kind, delta[0])(x, s, **cond), rtol=1e-10, atol=1e-10)
        assert (u - teacher(x, s, **cond)).abs().mean() > 1e-3


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_one_step_on_the_embedding_makes_the_path_live_and_jvp_t_is_right(saved, kind):
    teacher, cond, shape = _teacher(kind, saved)
    student = _student(teacher, kind)
    x = torch.randn(B, *shape, dtype=DTYPE)
    s, t = _times(teacher)
    assert jvp_t(student, x, s, t, **cond)[1].abs().max() == 0  # zero output layer: no t-dependence yet
    opt = torch.optim.SGD(student.delta_embedding.parameters(), lr=1.0)
    student(x, s, t, **cond).square().mean().backward()
    assert student.delta_embedding.mlp[-1].weight.grad.abs().max() > 0
    opt.step()
    with torch.no_grad():
        assert (student(x, s, t, **cond) - teacher(x, s, **cond)).abs().mean() > 1e-6
    u, du = jvp_t(student, x, s, t, **cond)
    with sdpa_kernel(SDPBackend.MATH):  # double-backward JVP: no forward AD at all
        ref_u, ref_du = torch.autograd.functional.jvp(lambda tt: student(x, s, tt, **cond), (t,),
                                                      (torch.ones_like(t),))
    torch.testing.assert_close(u, ref_u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(du, ref_du, rtol=1e-7, atol=1e-9)
    assert du.abs().mean() > 1e-8


class HandTwoTime(nn.Module):
    """u(x, s, t, class_labels) of a flow-matching DiT written out: -dit(x, 1000 (1 - s), class_labels) with
    ``delta(t - s)`` added to the output of every block's ``norm1.emb`` by hooks that live only during the call."""

    def __init__(self, dit: nn.Module, delta: nn.Module) -> None:
        super().__init__()
        self.dit, self.delta = dit, delta

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        emb = self.delta(t - s)
        handles = [block.norm1.emb.register_forward_hook(lambda m, a, out: out + emb)
                   for block in self.dit.transformer_blocks]
        try:
            return -self.dit(x, 1000 * (1 - s), class_labels=class_labels).sample
        finally:
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize("loss", ["itvm", "lfmd", "emd"])
def test_a_loss_step_through_the_student_equals_the_hand_built_one(saved, loss):
    teacher, _, _ = _teacher("dit", saved)
    student = two_time(teacher)
    _perturb(student)
    hand = HandTwoTime(copy.deepcopy(teacher.model).requires_grad_(True), copy.deepcopy(student.delta_embedding))
    x1 = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    kwargs = {"x0": torch.randn_like(x1), "s": torch.tensor([0.1, 0.3], dtype=DTYPE),
              "t": torch.tensor([0.6, 1.0], dtype=DTYPE), "cond": {"class_labels": torch.tensor([1, 3])}}
    fn = {"itvm": itvm_loss, "lfmd": lfmd_loss, "emd": emd_loss}[loss]
    results = []
    for model in (student, hand):
        if loss != "lfmd":
            kwargs["ema"] = EMA(model)
        model.zero_grad()
        value, _ = fn(model, teacher, x1, **kwargs)
        value.backward()
        results.append((value.detach(), [p.grad for p in model.parameters()]))
    (value, grads), (value_hand, grads_hand) = results
    torch.testing.assert_close(value, value_hand, rtol=1e-9, atol=0)
    assert float(value) > 0 and len(grads) == len(grads_hand)
    for g, g_hand in zip(grads, grads_hand, strict=True):
        torch.testing.assert_close(g, g_hand, rtol=1e-7, atol=1e-11)
    assert float(grads[-1].abs().sum()) > 0  # the (t - s) embedding's output layer learns


def test_ema_of_a_student_runs_its_own_embedding(saved):
    teacher, cond, shape = _teacher("dit", saved)
    student = two_time(teacher)
    _perturb(student)
    ema = EMA(student)
    x, (s, t) = torch.randn(B, *shape, dtype=DTYPE), _times(teacher)
    with torch.no_grad():
        before = student(x, s, t, **cond)
        _perturb(student)
        assert torch.equal(ema(x, s, t, **cond), before)
        assert not torch.equal(student(x, s, t, **cond), before)
    assert ema.t_range == teacher.t_range


def test_state_dict_and_save_pretrained_round_trips(saved, tmp_path):
    teacher, _ = load_unet(saved)
    student = two_time(teacher)
    _perturb(student)
    x = torch.randn(B, 3, 8, 8, dtype=DTYPE)
    s, t = _times(teacher)
    with torch.no_grad():
        u = student(x, s, t)
        fresh = two_time(teacher)
        fresh.load_state_dict(student.state_dict())
        assert torch.equal(fresh(x, s, t), u)
        assert student.save_pretrained(tmp_path / "student") == tmp_path / "student"
        assert sorted(p.name for p in (tmp_path / "student").iterdir()) == [
            "config.json", "diffusion_pytorch_model.safetensors", "two_time.json", "two_time_embedding.safetensors"]
        loaded = load_two_time(tmp_path / "student", teacher)
        assert isinstance(loaded.model, diffusers.UNet2DModel) and next(loaded.parameters()).dtype == DTYPE
        assert torch.equal(loaded(x, s, t), u)
        base = diffusers.UNet2DModel.from_pretrained(tmp_path / "student", torch_dtype=DTYPE)  # diffusers alone
        torch.testing.assert_close(base(x, 500.0).sample, student.model(x, 500.0).sample, rtol=0, atol=0)
    config = json.loads((tmp_path / "student" / "two_time.json").read_text())
    assert config["sites"] == ["time_embedding"] and config["prediction"] == "epsilon"
    flow_teacher = Teacher(teacher.model, "flow")
    with pytest.raises(ValueError, match="conversion"):
        load_two_time(tmp_path / "student", flow_teacher)
    with pytest.raises(FileNotFoundError, match=r"two_time\.json"):
        load_two_time(tmp_path, teacher)


def test_errors_name_the_argument(saved):
    teacher, _, _ = _teacher("custom", saved)
    with pytest.raises(ValueError, match="time_embedding='<submodule name>'"):
        two_time(teacher)
    with pytest.raises(ValueError, match="time_embedding='nope' names no submodule"):
        two_time(teacher, time_embedding="nope")
    with pytest.raises(ValueError, match="time_embedding='conv_in'"):
        two_time(teacher, time_embedding="conv_in")  # no Linear: not a (B, D) embedding
    with pytest.raises(TypeError, match=r"adapters\.Teacher"):
        two_time(teacher.model)
    with pytest.raises(TypeError, match="state_dict"):
        two_time(teacher, time_embedding="embed").save_pretrained("unused")
