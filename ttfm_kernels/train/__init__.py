"""Training infrastructure: data sets, metrics, checkpoints and the training loop used by the ``ttfm`` CLI."""

from ttfm_kernels.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ttfm_kernels.train.data import TOY_DATASETS, ArrayData, PointData, ToyData, load_data
from ttfm_kernels.train.metrics import histogram_kl, sliced_w2, teacher_match_rmse
from ttfm_kernels.train.trainer import TrainConfig, Trainer, TrainingDiverged, seed_everything

__all__ = ["TOY_DATASETS", "ArrayData", "CheckpointError", "PointData", "ToyData", "TrainConfig", "Trainer",
           "TrainingDiverged", "histogram_kl", "load_checkpoint", "load_data", "save_checkpoint", "seed_everything",
           "sliced_w2", "teacher_match_rmse"]
