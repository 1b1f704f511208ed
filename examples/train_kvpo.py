"""KVPO training of a streaming causal Wan DiT.

    torchrun --nproc_per_node 2 examples/train_kvpo.py                 # embedded tiny default, CPU/gloo, minutes
    torchrun --nproc_per_node 8 examples/train_kvpo.py --config examples/configs/kvpo_longlive_1.3b.yaml
    torchrun --nproc_per_node 8 examples/train_kvpo.py --preset memflow-1.3b --config my_paths.yaml
    python examples/train_kvpo.py train.iterations=5 rollout.num_branches=4     # dotted overrides

Without --config/--preset the embedded tiny default (kvpo_megatron/kvpo/train_config.py: TINY_DEFAULT) is
used; otherwise preset <- file <- overrides on top of the method's defaults.
"""
from kvpo_megatron.cli import parse_args, run_main
from kvpo_megatron.config import load_config


def main() -> None:
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
    from kvpo_megatron.kvpo.trainer import KVPOTrainer
    from kvpo_megatron.presets import generator_preset

    args = parse_args(__doc__)
    if args.config is None and args.preset is None:
        base = TINY_DEFAULT
    else:
        base = generator_preset(args.preset) if args.preset else {}
    KVPOTrainer(load_config(KVPOTrainConfig, args.config, args.overrides, base=base)).train()


if __name__ == "__main__":
    run_main(main)
