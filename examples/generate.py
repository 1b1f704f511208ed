"""Streaming (multi-prompt) video generation with a causal Wan DiT and its KV cache.

    python examples/generate.py                                   # tiny random model on CPU, seconds
    python examples/generate.py --config examples/configs/generate_tiny.yaml video.num_frames=30
    torchrun --nproc_per_node 2 examples/generate.py parallel.tensor_model_parallel_size=2
"""
from kvpo_megatron.cli import parse_args, run_main
from kvpo_megatron.config import load_config
from kvpo_megatron.generation import GenerateConfig, run_generation


def main() -> None:
    args = parse_args(__doc__)
    run_generation(load_config(GenerateConfig, args.config, args.overrides))


if __name__ == "__main__":
    run_main(main)
