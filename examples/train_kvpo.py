"""KVPO training of a streaming causal Wan DiT.

    torchrun --nproc_per_node 2 examples/train_kvpo.py                 # embedded tiny default, CPU/gloo, minutes
    torchrun --nproc_per_node 8 examples/train_kvpo.py --config examples/configs/kvpo_longlive_1.3b.yaml
    python examples/train_kvpo.py train.iterations=5 rollout.num_branches=4     # dotted overrides

Without --config the embedded tiny default (kvpo_megatron/kvpo/train_config.py: TINY_DEFAULT) is used;
with --config the file's values override the method's defaults.
"""
from kvpo_megatron.cli import parse_args, run_main
from kvpo_megatron.config import deep_merge, from_dict, load_config, parse_overrides


def main() -> None:
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    args = parse_args(__doc__)
    if args.config is None:
        cfg = from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides(args.overrides)))
    else:
        cfg = load_config(KVPOTrainConfig, args.config, args.overrides)
    KVPOTrainer(cfg).train()


if __name__ == "__main__":
    run_main(main)
