from setuptools import find_packages, setup

setup(
    name="kvpo_megatron",
    version="0.1.0",
    description="KVPO (ODE-native GRPO with Causal History Routing) for streaming AR video DiTs on megatron-core",
    packages=find_packages(include=["kvpo_megatron", "kvpo_megatron.*"]),
    package_data={"kvpo_megatron.data": ["*.txt", "*.jsonl"]},
    python_requires=">=3.11",
    # Everything the main job (examples/train_kvpo.py: metrics, reward_curve.png, TensorBoard events, adapters)
    # imports; tests/test_install.py runs it with nothing else importable. megatron-core 0.19.2 declares Python
    # >= 3.12: on 3.11 scripts/install.sh installs it with --no-deps --ignore-requires-python.
    install_requires=["torch", "numpy", "pyyaml", "einops", "safetensors", "peft", "tqdm", "matplotlib",
                      "tensorboard", "megatron-core==0.19.2; python_version >= '3.12'"],
    # Features a config selects (kvpo_megatron/extras.py names the extra when one is missing).
    extras_require={
        "models": ["diffusers", "transformers", "accelerate", "sentencepiece", "protobuf"],  # umT5, Wan VAE, rewards
        "data": ["tensorstore", "ml_dtypes"],  # embedding store, rollout archive
        "media": ["imageio", "av"],  # mp4 output (generation, training's sample videos, tools/evaluate.py)
        "te": ["transformer_engine[pytorch]"],
        "wandb": ["wandb"],  # logging.wandb
        "test": ["pytest", "diffusers", "transformers", "accelerate", "sentencepiece", "protobuf", "tensorstore",
                 "ml_dtypes", "imageio", "av"],
    },
)
