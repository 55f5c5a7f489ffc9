"""Reference models: teachers v(x, t) and two-time students u(x, s, t) (CONTRACTS.md "Modules and models")."""

from ttfm_kernels.models.embeddings import TimeEmbedding, TwoTimeEmbedding, sinusoidal_embedding
from ttfm_kernels.models.mlp import MLP, TwoTimeMLP

__all__ = ["MLP", "TimeEmbedding", "TwoTimeEmbedding", "TwoTimeMLP", "sinusoidal_embedding"]
