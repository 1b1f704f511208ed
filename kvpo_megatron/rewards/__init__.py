"""Rewards: component contract, built-in weight-free components, HPSv3, VideoAlign, and the composite reward.

HPSv3/VideoAlign's libraries (transformers, accelerate) are imported only when a config names them.
"""
from kvpo_megatron.rewards.base import RewardComponent, RewardOutput, as_unit_frames
from kvpo_megatron.rewards.builtin import (
    BUILTIN_COMPONENTS,
    BrightnessReward,
    ColorfulnessReward,
    ColorTargetReward,
    MotionReward,
    TemporalConsistencyReward,
)
from kvpo_megatron.rewards.composite import (
    CompositeReward,
    RewardComponentConfig,
    RewardConfig,
    RewardKind,
    build_reward,
    spans_from_switch_frames,
)

__all__ = [
    "BUILTIN_COMPONENTS", "BrightnessReward", "ColorTargetReward", "ColorfulnessReward", "CompositeReward",
    "MotionReward", "RewardComponent", "RewardComponentConfig", "RewardConfig", "RewardKind", "RewardOutput",
    "TemporalConsistencyReward", "as_unit_frames", "build_reward", "spans_from_switch_frames",
]
