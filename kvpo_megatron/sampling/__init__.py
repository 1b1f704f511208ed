"""Few-step flow-matching sampler and the block-by-block streaming loop."""
from kvpo_megatron.sampling.flow_matching import FlowMatchSampler, SamplerConfig, SamplerKind
from kvpo_megatron.sampling.streaming import PromptSwitch, StreamingGenerator

__all__ = ["FlowMatchSampler", "SamplerConfig", "SamplerKind", "StreamingGenerator", "PromptSwitch"]
