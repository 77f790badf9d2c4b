"""Train a seeded pair (or N nets) with Accelerate.

    accelerate launch examples/train_pair.py --config configs/fmnist_mlp_2x512.yaml --output-dir runs/pair
    accelerate launch examples/train_pair.py --config configs/kjv_llama_tiny.yaml --output-dir runs/kjv_llama
    accelerate launch --multi_gpu --num_processes 2 examples/train_pair.py --config ... --output-dir ...

Under several processes the nets are shared out (net i on process i % world size); the weights
are the same as with one process.
"""

import argparse
import sys

from hf_permerge.allocator import reuse_freed_memory
from hf_permerge.config import load_config
from hf_permerge.training import PairTrainer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run YAML (see configs/); its training section is used")
    p.add_argument("--output-dir", required=True, help="pair folder to write; refused if it exists and is not empty")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set training.max_steps=10 (repeatable; values parsed as YAML)",
    )
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--overwrite", action="store_true", help="replace an existing pair folder of ours")
    modes.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    args = p.parse_args()
    reuse_freed_memory()  # large CPU tensors from reused memory, not fresh pages (hf_permerge/allocator.py)
    try:
        config = load_config(args.config, args.overrides)
        trainer = PairTrainer(config, args.output_dir, overwrite=args.overwrite, resume=args.resume)
        result = trainer.train()
    except (ValueError, OSError, RuntimeError) as err:  # what `hf-permerge` reports without a traceback
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    if trainer.accelerator.is_main_process:
        for m in result.metrics:
            print(f"net {m['net']}: test loss {m['test']['loss']:.4f}, test acc {m['test']['acc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
