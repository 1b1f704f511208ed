"""kvpo-megatron: KVPO alignment for streaming autoregressive video DiTs on megatron-core."""
