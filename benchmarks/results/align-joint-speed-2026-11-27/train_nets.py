import sys
from pathlib import Path
from hf_permerge.config import config_from_dict
from hf_permerge.training import PairTrainer
folder = Path("/tmp/joint/w2048")
cfg = config_from_dict({"model": {"type": "mlp", "depth": 1, "width": 2048},
                        "training": {"num_nets": 8, "seed": 0, "epochs": 1, "optimizer": "adamw",
                                     "lr": 1e-3, "weight_decay": 1e-2}})
PairTrainer(cfg, folder, progress=False, resume=folder.exists()).train()
