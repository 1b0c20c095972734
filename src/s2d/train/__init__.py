"""One task-agnostic fine-tuning loop; it uses s2d.regularize but knows nothing of S2D's internals."""

from s2d.train.config import TrainConfig
from s2d.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
