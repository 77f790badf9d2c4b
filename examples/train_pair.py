"""Train a seeded pair (or N nets) with Accelerate.

    accelerate launch examples/train_pair.py --config configs/fmnist_mlp_2x512.yaml --output-dir runs/pair
    accelerate launch --multi_gpu --num_processes 2 examples/train_pair.py --config ... --output-dir ...

Under several processes the nets are shared out (net i on process i % world size); the weights
are the same as with one process.
"""
import argparse

from hf_permerge.config import load_config
from hf_permerge.training import PairTrainer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    config = load_config(args.config, args.overrides)
    trainer = PairTrainer(config, args.output_dir, overwrite=args.overwrite, resume=args.resume)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        for m in result.metrics:
            print(f"net {m['net']}: test acc {m['test']['acc']:.4f}")


if __name__ == "__main__":
    main()
