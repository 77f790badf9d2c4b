"""Training: PairTrainer (Accelerate) over the stacked or per-net engine."""

from .builders import build_model, model_config_for
from .seeds import derive_seed
from .trainer import PairTrainer, TrainResult, train_together

__all__ = ["PairTrainer", "TrainResult", "train_together", "build_model", "model_config_for", "derive_seed"]
