"""Training: PairTrainer (Accelerate) over the stacked or per-net engine."""
from .builders import build_model, model_config_for
from .seeds import derive_seed
from .trainer import PairTrainer, TrainResult

__all__ = ["PairTrainer", "TrainResult", "build_model", "model_config_for", "derive_seed"]
