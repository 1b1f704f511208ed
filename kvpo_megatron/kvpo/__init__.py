"""KVPO: Causal History Routing rollout -> velocity replay -> TVE/Gibbs policy -> clipped PPO + KL."""
