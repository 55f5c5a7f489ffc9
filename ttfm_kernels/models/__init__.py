"""Reference models: teachers v(x, t) and two-time students u(x, s, t) (docs/design.md, "Modules and models")."""

from ttfm_kernels.models.distributed import check_fsdp_forward_jvp, register_fsdp_forward_jvp
from ttfm_kernels.models.dit import DiT, TwoTimeDiT
from ttfm_kernels.models.embeddings import TimeEmbedding, TwoTimeEmbedding, sinusoidal_embedding
from ttfm_kernels.models.mlp import MLP, TwoTimeMLP
from ttfm_kernels.models.unet import TwoTimeUNet, UNet

__all__ = ["MLP", "DiT", "TimeEmbedding", "TwoTimeDiT", "TwoTimeEmbedding", "TwoTimeMLP", "TwoTimeUNet", "UNet",
           "check_fsdp_forward_jvp", "register_fsdp_forward_jvp", "sinusoidal_embedding"]
