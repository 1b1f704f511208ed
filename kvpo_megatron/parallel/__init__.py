"""Parallelism: process groups, CPU adaptations of megatron-core, TP-aware norms, context-parallel attention."""
