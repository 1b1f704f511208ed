"""Streaming (multi-prompt) video generation with a causal Wan DiT and its KV cache.

    python examples/generate.py                                   # tiny random model on CPU, seconds
    python examples/generate.py --config examples/configs/generate_tiny.yaml video.num_frames=30
    python examples/generate.py --preset longlive-1.3b --config examples/configs/generate_wan13b.yaml \
        model.checkpoint=ckpt/longlive    # LongLive's own sampler/cache (also self-forcing-1.3b, memflow-1.3b)
    torchrun --nproc_per_node 2 examples/generate.py parallel.tensor_model_parallel_size=2
"""
from kvpo_megatron.cli import parse_args, run_main
from kvpo_megatron.config import load_config
from kvpo_megatron.generation import GenerateConfig, run_generation


def main() -> None:
    from kvpo_megatron.presets import GENERATE_SECTIONS, generator_preset

    args = parse_args(__doc__)
    base = generator_preset(args.preset, GENERATE_SECTIONS) if args.preset else None
    run_generation(load_config(GenerateConfig, args.config, args.overrides, base=base))


if __name__ == "__main__":
    run_main(main)
