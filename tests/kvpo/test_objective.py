"""KVPO formulas against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from kvpo_megatron.kvpo.config import Baseline, ObjectiveConfig
from kvpo_megatron.kvpo.objective import (advantages, discrete_kl, gibbs_log_policy, guard_passes, kvpo_loss,
                                          multi_advantages, policy_ratio, ppo_loss, tve_coefficients, tve_term)


def test_tve_term_is_mean_squared_residual_per_sample():
    vt = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # D = 4
    vr = torch.tensor([[[0.0, 2.0], [3.0, 2.0]]])
    assert tve_term(vt, vr).tolist() == [pytest.approx((1 + 0 + 0 + 4) / 4)]


def test_gibbs_policy_and_ratio():
    tve = torch.tensor([1.0, 2.0, 4.0])
    p = gibbs_log_policy(tve, tau=2.0).exp()
    z = math.exp(-0.5) + math.exp(-1.0) + math.exp(-2.0)
    assert p.tolist() == pytest.approx([math.exp(-0.5) / z, math.exp(-1.0) / z, math.exp(-2.0) / z])
    r = policy_ratio(torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.75])))
    assert r.tolist() == pytest.approx([2.0, 2 / 3])


def test_asymmetric_clip_both_sides():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.05])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    # pos adv, ratio high: min(1.5, 1.2)=1.2 | pos adv, ratio low: min(0.5, 0.9)=0.5
    # neg adv, ratio high: min(-1.5, -1.2)=-1.5 | neg adv, ratio low: min(-0.5, -0.9)=-0.9 | inside: 2.1
    want = -(1.2 + 0.5 - 1.5 - 0.9 + 2.1) / 5
    assert ppo_loss(ratio, adv, eps_low=0.1, eps_high=0.2).item() == pytest.approx(want)


def test_advantages_both_baselines_and_clip():
    r = torch.tensor([1.0, 2.0, 3.0])
    # anchor: std of [1,2,3,0] (unbiased) = sqrt(5/3)
    s = math.sqrt(5 / 3)
    assert advantages(r, 0.0).tolist() == pytest.approx([1 / s, 2 / s, 3 / s], rel=1e-5)  # 3/s = 2.32 < 2.5
    s_g = 1.0  # std of [1,2,3]
    assert advantages(r, 0.0, baseline=Baseline.group_mean).tolist() == pytest.approx([-1 / s_g, 0.0, 1 / s_g], abs=1e-5)
    big = advantages(torch.tensor([0.0] * 6 + [100.0]), 0.0)  # 100 / std([0]*7+[100]) = 2.83
    assert big.max().item() == pytest.approx(2.5)  # clipped


def test_multi_reward_normalises_per_component():
    comps = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([100.0, 300.0])}
    anchors = {"a": 2.0, "b": 200.0}
    adv = multi_advantages(comps, anchors, {"a": 1.0, "b": 0.5})
    single = advantages(comps["a"], 2.0)
    assert adv.tolist() == pytest.approx((1.5 * single).tolist(), rel=1e-5)  # scale-free per component


def test_discrete_kl_and_guard():
    lp = torch.log(torch.tensor([0.5, 0.5]))
    lq = torch.log(torch.tensor([0.25, 0.75]))
    assert discrete_kl(lp, lq).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert discrete_kl(lp, lp).item() == 0.0
    assert not guard_passes(torch.tensor([0.1, 0.2]), 0.2)
    assert guard_passes(torch.tensor([0.1, 0.21]), 0.2)


def test_loss_total_and_coefficients_match_autograd():
    cfg = ObjectiveConfig(beta=10.0, tau=0.5)
    tve = torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.25, 0.12, 0.2, 0.5], dtype=torch.float64)
    ref = torch.tensor([0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.2, -1.0], dtype=torch.float64)
    terms = kvpo_loss(tve, old, ref, adv, cfg)
    logp = torch.log_softmax(-tve / 0.5, 0)
    ratio = torch.exp(logp - torch.log_softmax(-old / 0.5, 0))
    ppo = -torch.minimum(ratio * adv, ratio.clamp(0.9, 1.2) * adv).mean()
    kl = (logp.exp() * (logp - torch.log_softmax(-ref / 0.5, 0))).sum()
    assert terms.total.item() == pytest.approx((ppo + 10 * kl).item())
    (g,) = torch.autograd.grad(terms.total, tve)
    c, _ = tve_coefficients(tve.detach(), old, ref, adv, cfg)
    assert torch.allclose(c.double(), g, atol=1e-6)


def test_positive_advantage_lowers_its_energy():
    """dLoss/dTVE_k < 0 for the best branch: a gradient step lowers its TVE, i.e. raises its pi."""
    tve = torch.tensor([0.2, 0.2, 0.2])
    c, _ = tve_coefficients(tve, tve, tve, torch.tensor([1.0, 0.0, -1.0]), ObjectiveConfig())
    assert c[0] > 0  # loss increases with TVE of the good branch -> descent lowers it
    assert c[2] < 0
