from setuptools import find_packages, setup

setup(
    name="kvpo_megatron",
    version="0.1.0",
    description="KVPO (ODE-native GRPO with Causal History Routing) for streaming AR video DiTs on megatron-core",
    packages=find_packages(include=["kvpo_megatron", "kvpo_megatron.*"]),
    package_data={"kvpo_megatron.data": ["*.txt", "*.jsonl"]},
    python_requires=">=3.11",
    # megatron-core is installed by scripts/install.sh with --no-deps --ignore-requires-python.
    install_requires=["torch", "numpy", "pyyaml", "einops", "safetensors", "peft", "tqdm"],
    extras_require={
        "test": ["pytest", "diffusers", "transformers", "sentencepiece", "protobuf", "tensorstore"],
        "te": ["transformer_engine[pytorch]"],
        "media": ["imageio", "av", "matplotlib", "tensorboard", "pillow"],
        "wandb": ["wandb"],
    },
)
