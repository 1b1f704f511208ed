"""KVPO objective as pure tensor functions (G = number of branches).

    TVE_k   = sum_{(b,s) in tuples of k} (1/D) * || v_target - v_replay ||^2            (trajectory velocity energy)
    pi(k)   = softmax_k(-TVE_k / tau)                                                  (Gibbs surrogate policy)
    rho_k   = exp(log pi_theta(k) - log pi_old(k))
    A_k     = clip((r_k - r_anchor) / (std(r_1..r_G, r_anchor) + 1e-6), -c, c)         (anchor baseline)
            | clip((r_k - mean_k r) / (std_k r + 1e-6), -c, c)                          (group-mean baseline)
    L_PPO   = -mean_k min(rho_k A_k, clip(rho_k, 1 - eps_low, 1 + eps_high) A_k)
    KL      = sum_k pi_theta(k) (log pi_theta(k) - log pi_ref(k))
    L       = L_PPO + beta * KL
std is the unbiased sample standard deviation (torch's default). With several reward components, advantages
are normalised and clipped per component, then weighted and summed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpo_megatron.kvpo.config import Baseline, ObjectiveConfig


def tve_term(v_target: torch.Tensor, v_replay: torch.Tensor) -> torch.Tensor:
    """(1/D) ||v_target - v_replay||^2 per sample of a batch: [b, ...] -> [b] (D = features per sample)."""
    diff = (v_target.float() - v_replay.float()).flatten(1)
    return diff.pow(2).mean(dim=1)


def gibbs_log_policy(tve: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(-TVE / tau) over branches: [G] -> [G]."""
    return torch.log_softmax(-tve / tau, dim=-1)


def policy_ratio(logp: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    return torch.exp(logp - logp_old.detach())


def advantages(rewards: torch.Tensor, anchor: torch.Tensor | float, *, baseline: Baseline = Baseline.anchor,
               clip: float = 2.5) -> torch.Tensor:
    """Normalised, clipped advantages of G branch rewards [G]."""
    rewards = rewards.double()
    if baseline == Baseline.anchor:
        anchor = torch.as_tensor(anchor, dtype=torch.float64)
        std = torch.cat([rewards, anchor.reshape(1)]).std()
        adv = (rewards - anchor) / (std + 1e-6)
    else:
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return adv.clamp(-clip, clip).float()


def multi_advantages(components: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor | float],
                     weights: dict[str, float], *, baseline: Baseline = Baseline.anchor,
                     clip: float = 2.5) -> torch.Tensor:
    """Per-component advantages, then their weighted sum: [G]."""
    total = None
    for name, r in components.items():
        a = weights[name] * advantages(r, anchors[name], baseline=baseline, clip=clip)
        total = a if total is None else total + a
    return total


def ppo_loss(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -torch.minimum(ratio * adv, clipped * adv).mean()


def discrete_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logp_ref.detach())).sum()


def guard_passes(branch_rewards: torch.Tensor, anchor_reward: float) -> bool:
    """True when at least one branch beats the anchor (otherwise the iteration makes no update)."""
    return bool((branch_rewards > anchor_reward).any())


@dataclass(kw_only=True)
class LossTerms:
    total: torch.Tensor
    ppo: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clip_frac: float
    entropy: float


def kvpo_loss(tve: torch.Tensor, tve_old: torch.Tensor, tve_ref: torch.Tensor, adv: torch.Tensor,
              cfg: ObjectiveConfig) -> LossTerms:
    """The full loss as a function of the G-vector ``tve`` (which carries the gradient)."""
    logp = gibbs_log_policy(tve, cfg.tau)
    logp_old = gibbs_log_policy(tve_old.detach(), cfg.tau)
    logp_ref = gibbs_log_policy(tve_ref.detach(), cfg.tau)
    ratio = policy_ratio(logp, logp_old)
    ppo = ppo_loss(ratio, adv, cfg.eps_low, cfg.eps_high)
    kl = discrete_kl(logp, logp_ref)
    r = ratio.detach()
    clip_frac = float(((r < 1 - cfg.eps_low) | (r > 1 + cfg.eps_high)).float().mean())
    entropy = float(-(logp.exp() * logp).sum().detach())
    return LossTerms(total=ppo + cfg.beta * kl, ppo=ppo, kl=kl, ratio=ratio, clip_frac=clip_frac, entropy=entropy)


def tve_coefficients(tve: torch.Tensor, tve_old: torch.Tensor, tve_ref: torch.Tensor, adv: torch.Tensor,
                     cfg: ObjectiveConfig) -> tuple[torch.Tensor, LossTerms]:
    """c_k = dLoss/dTVE_k at the given TVEs (the loss depends on the parameters only through TVE)."""
    x = tve.detach().double().clone().requires_grad_(True)
    terms = kvpo_loss(x, tve_old.double(), tve_ref.double(), adv.double(), cfg)
    (grad,) = torch.autograd.grad(terms.total, x)
    return grad.float(), terms
