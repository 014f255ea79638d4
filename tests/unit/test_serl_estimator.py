"""SERL estimator against hand-computed values (the released rule, verl_hindsight/algo/serl.py)."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn

import verl_hindsight.algo.serl  # noqa: F401  (registers "serl")
from verl_hindsight.algo.serl import compute_serl_advantage, serl_reweight, serl_weights
from verl_hindsight.config import SERLConfig, load_serl_config


def _config(**serl):
    return OmegaConf.create({"norm_adv_by_std_in_grpo": True, "serl": serl})


def _batch():
    # two groups of two rollouts: rewards (1, 0) -> A = +-1/std; (0.5, 0.5) -> zero-variance group -> A = 0
    rewards = torch.zeros(4, 3)
    rewards[0, -1], rewards[1, -1], rewards[2, -1], rewards[3, -1] = 1.0, 0.0, 0.5, 0.5
    mask = torch.ones(4, 3)
    index = np.array(["a", "a", "b", "b"], dtype=object)
    return rewards, mask, index


def test_registered_and_reweights_only_hindsight_tokens_by_hand():
    rewards, mask, index = _batch()
    old = torch.zeros(4, 3)
    teacher = torch.tensor([[0.1, -0.1, 0.0], [0.1, -0.1, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0]])
    hmask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    fn = get_adv_estimator_fn("serl")
    adv, ret = fn(token_level_rewards=rewards, response_mask=mask, index=index, config=_config(),
                  teacher_log_probs=teacher, old_log_probs=old, hindsight_mask=hmask, updates_done=0)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    a = grpo[0, 0].item()  # (1 - 0.5) / std([1, 0]) with torch's unbiased std = 0.5 / 0.7071
    assert a == pytest.approx(0.5 / math.sqrt(0.5), rel=1e-5)
    l = 0.5  # step 0
    # row 0, A > 0: d = +0.1 -> w = exp(0.1) = 1.10517 (inside the clip); d = -0.1 -> w = exp(-0.1) = 0.904837
    assert adv[0, 0].item() == pytest.approx(a * ((1 - l) + l * math.exp(0.1)), rel=1e-5)
    assert adv[0, 1].item() == pytest.approx(a * ((1 - l) + l * math.exp(-0.1)), rel=1e-5)
    assert adv[0, 2].item() == pytest.approx(a, rel=1e-6)  # not a hindsight token
    # row 1, A < 0: sign flips the gap: d = +0.1 -> w = exp(-0.1)
    assert adv[1, 0].item() == pytest.approx(-a * ((1 - l) + l * math.exp(-0.1)), rel=1e-5)
    assert adv[1, 1].item() == pytest.approx(-a * ((1 - l) + l * math.exp(0.1)), rel=1e-5)
    # zero-variance group: A = 0 stays 0 whatever the gap (sign(0) = 0 -> w = 1)
    assert torch.all(adv[2:] == 0)
    assert torch.equal(adv, ret)


def test_gap_beyond_the_clamp_and_the_clip():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    gap_teacher = torch.tensor([[100.0, -100.0, 100.0, -100.0]])  # clamp(+-100) = +-20, then clip to 1 +- eps
    w = serl_weights(adv, gap_teacher, torch.zeros_like(adv), weight_clip=0.2)
    assert w[0].tolist() == pytest.approx([1.2, 0.8, 0.8, 1.2])
    assert torch.isfinite(w).all()


def test_lambda_decay_endpoints():
    cfg = SERLConfig()  # released defaults
    assert (cfg.weight_clip, cfg.mixing_lambda, cfg.lambda_decay_steps) == (0.2, 0.5, 50)
    assert cfg.mixing(0) == 0.5
    assert cfg.mixing(25) == pytest.approx(0.25)
    assert cfg.mixing(50) == 0.0
    assert cfg.mixing(500) == 0.0  # never negative
    # l = 0: SERL is exactly GRPO
    rewards, mask, index = _batch()
    teacher = torch.randn(4, 3)
    adv, _ = get_adv_estimator_fn("serl")(token_level_rewards=rewards, response_mask=mask, index=index,
                                          config=_config(), teacher_log_probs=teacher, old_log_probs=torch.zeros(4, 3),
                                          hindsight_mask=torch.ones(4, 3), updates_done=50)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    assert torch.equal(adv, grpo)


def test_property_deviation_bounded_by_lambda_times_clip():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        a = torch.randn(8, 16, generator=gen) * 3
        teacher = torch.randn(8, 16, generator=gen) * 5
        old = torch.randn(8, 16, generator=gen) * 5
        mask = torch.rand(8, 16, generator=gen) > 0.5
        eps = float(torch.rand(1, generator=gen)) * 0.9
        lam = float(torch.rand(1, generator=gen))
        out, _ = serl_reweight(a, teacher, old, mask, lam, eps)
        assert torch.all((out - a).abs() <= lam * eps * a.abs() + 1e-6), trial
        assert torch.equal(out[~mask], a[~mask])
        assert torch.all(torch.sign(out) == torch.sign(a))  # the reward keeps the direction


def test_norm_adv_by_std_is_honoured():
    rewards, mask, index = _batch()
    cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": False, "serl": {}})
    adv, _ = get_adv_estimator_fn("serl")(token_level_rewards=rewards, response_mask=mask, index=index, config=cfg,
                                          teacher_log_probs=torch.zeros(4, 3), old_log_probs=torch.zeros(4, 3),
                                          hindsight_mask=torch.zeros(4, 3), updates_done=0)
    assert adv[0, 0].item() == pytest.approx(0.5)  # mean-centred only


def test_stock_call_without_hindsight_inputs_says_how_to_enable():
    rewards, mask, index = _batch()
    with pytest.raises(ValueError, match="hindsight.enable=true"):
        get_adv_estimator_fn("serl")(token_level_rewards=rewards, response_mask=mask, index=index, config=_config())


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="algorithm.serl.weight_clip"):
        SERLConfig(weight_clip=1.5)
    with pytest.raises(ValueError, match="algorithm.serl.decay"):
        load_serl_config(OmegaConf.create({"serl": {"decay": 3}}))
    with pytest.raises(ValueError, match="algorithm.serl.base_estimator must be one of .*'rloo'"):
        SERLConfig(base_estimator="gae")  # needs a critic: not an outcome estimator SERL can reweight


def test_the_registry_returns_the_function_the_trainer_calls():
    # the hindsight trainer looks the estimator up by algorithm.adv_estimator; nothing else computes SERL
    assert get_adv_estimator_fn("serl") is compute_serl_advantage


def test_rloo_base_estimator_by_hand():
    rewards, mask, index = _batch()
    old = torch.zeros(4, 3)
    teacher = torch.full((4, 3), 0.1)
    hmask = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    metrics = {}
    adv, _ = get_adv_estimator_fn("serl")(token_level_rewards=rewards, response_mask=mask, index=index,
                                          config=_config(base_estimator="rloo"), teacher_log_probs=teacher,
                                          old_log_probs=old, hindsight_mask=hmask, updates_done=0, metrics=metrics)
    # RLOO over a group of two: A_i = r_i - r_other -> (+1, -1); group b: 0.5 - 0.5 = 0
    base = torch.tensor([[1.0] * 3, [-1.0] * 3, [0.0] * 3, [0.0] * 3])
    w_pos, w_neg = math.exp(0.1), math.exp(-0.1)  # sign(A) * d with d = +0.1, inside the 0.2 clip
    expected = base.clone()
    expected[0, 0] = 1.0 * (0.5 + 0.5 * w_pos)
    expected[1, 0] = -1.0 * (0.5 + 0.5 * w_neg)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert metrics["serl/changed_tokens"] == 2 and metrics["serl/changed_tokens_outside_hindsight_mask"] == 0


def test_given_base_advantages_are_reweighted_not_recomputed():
    rewards, mask, index = _batch()
    base = torch.randn(4, 3)
    teacher, old = torch.randn(4, 3), torch.randn(4, 3)
    hmask = torch.ones(4, 3)
    adv, _ = compute_serl_advantage(rewards, mask, index, _config(), teacher_log_probs=teacher, old_log_probs=old,
                                    hindsight_mask=hmask, updates_done=0, base_advantages=base)
    expected, _ = serl_reweight(base, teacher, old, hmask.bool(), 0.5, 0.2)
    assert torch.equal(adv, expected)


# --- credit rules (algorithm.serl.credit_rule), by hand -------------------------------------------------------------
# One case for every rule: row 0 has A = +1, row 1 has A = -1 except a last token of a zero-advantage group (A = 0).
# d = teacher - old log-prob; row 0's last token is outside the hindsight mask. l = 0.5 (step 0 of the defaults).
RULE_A = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, 0.0]])
RULE_D = torch.tensor([[3.0, -3.0, 0.1, 2.0], [0.5, 3.0, 0.1, 0.7]])
RULE_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
E = math.exp


def _rule(credit_rule, mixing=0.5, **serl):
    from verl_hindsight.algo.serl import apply_credit_rule

    return apply_credit_rule(RULE_A, RULE_D, torch.zeros_like(RULE_D), RULE_MASK, mixing,
                             SERLConfig(credit_rule=credit_rule, **serl))


def test_serl_rule_by_hand_never_flips():
    out, metrics = _rule("serl")
    # A * (0.5 + 0.5 * clip(exp(sign(A) d), 0.8, 1.2)); sign(A) d per token: row 0 (3, -3, 0.1), row 1 (-0.5, -3, -0.1)
    expected = [[1 * (0.5 + 0.5 * 1.2),  # exp(3) = 20.1 -> 1.2
                 1 * (0.5 + 0.5 * 0.8),  # exp(-3) = 0.05 -> 0.8: a token the teacher rejects keeps A's sign
                 1 * (0.5 + 0.5 * E(0.1)),
                 1.0],  # not a hindsight token
                [-1 * (0.5 + 0.5 * 0.8),  # exp(-0.5) = 0.61 -> 0.8
                 -1 * (0.5 + 0.5 * 0.8),  # the teacher prefers this token of a failure (d = +3): still pushed down
                 -1 * (0.5 + 0.5 * E(-0.1)),
                 0.0]]  # A = 0 stays 0
    assert torch.allclose(out, torch.tensor(expected), rtol=1e-6, atol=0)
    assert metrics["serl/sign_flipped_frac"] == 0.0 and metrics["serl/hindsight_tokens"] == 7


def test_rlsd_rule_by_hand_is_unbounded_but_never_flips():
    out, metrics = _rule("rlsd")
    expected = [[0.5 + 0.5 * E(3.0),  # 10.54: no clip
                 0.5 + 0.5 * E(-3.0),
                 0.5 + 0.5 * E(0.1),
                 1.0],
                [-(0.5 + 0.5 * E(-0.5)),
                 -(0.5 + 0.5 * E(-3.0)),  # -0.525: the weight shrinks the blame but never turns it into credit
                 -(0.5 + 0.5 * E(-0.1)),
                 0.0]]
    assert torch.allclose(out, torch.tensor(expected), rtol=1e-6, atol=0)
    assert out[0, 0].item() == pytest.approx(10.542768, rel=1e-6)
    assert metrics["serl/sign_flipped_frac"] == 0.0
    assert metrics["serl/weight_max"] == pytest.approx(E(3.0), rel=1e-6)


def test_additive_rule_by_hand_flips_where_the_teacher_outweighs_the_reward():
    out, metrics = _rule("additive", additive_beta=1.0)
    # A + l * beta * d = A + 0.5 * d on hindsight tokens
    expected = [[1 + 0.5 * 3.0,  # 2.5
                 1 + 0.5 * -3.0,  # -0.5: a success's token the teacher rejects is pushed down (flipped)
                 1 + 0.5 * 0.1,  # 1.05
                 1.0],  # outside the mask: untouched whatever d
                [-1 + 0.5 * 0.5,  # -0.75
                 -1 + 0.5 * 3.0,  # +0.5: a failure's token the teacher prefers is pushed up (flipped)
                 -1 + 0.5 * 0.1,  # -0.95
                 0 + 0.5 * 0.7]]  # 0.35: a zero-advantage group still gets the teacher's credit (not a flip)
    assert torch.allclose(out, torch.tensor(expected), rtol=1e-6, atol=0)
    assert metrics["serl/sign_flipped_frac"] == pytest.approx(2 / 7)
    assert metrics["serl/additive_term_abs_mean"] == pytest.approx((1.5 + 1.5 + 0.05 + 0.25 + 1.5 + 0.05 + 0.35) / 7)
    # beta scales the term: at beta 0.5 no |0.25 d| exceeds |A| = 1, so nothing flips
    out, metrics = _rule("additive", additive_beta=0.5)
    assert out[0, 1].item() == pytest.approx(1 - 0.25 * 3.0) and metrics["serl/sign_flipped_frac"] == 0.0


@pytest.mark.parametrize("rule", ["serl", "rlsd", "additive"])
def test_every_rule_is_the_base_estimator_at_lambda_zero(rule):
    out, metrics = _rule(rule, mixing=0.0)
    assert torch.equal(out, RULE_A) and metrics["serl/sign_flipped_frac"] == 0.0


def test_default_rule_is_bitwise_the_released_formula():
    """credit_rule=serl against the released computation written out here, on random values with gaps past the
    clamp: the same bits, not just close."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 20, generator=gen) * 2
    a[0] = 0.0
    teacher, old = torch.randn(6, 20, generator=gen) * 30, torch.randn(6, 20, generator=gen) * 3
    mask = torch.rand(6, 20, generator=gen) > 0.3
    for lam, eps in ((0.5, 0.2), (0.37, 0.9), (1.0, 1.0)):
        signed = torch.clamp(torch.sign(a.float()) * (teacher.float() - old.float()), -20.0, 20.0)
        w = torch.clamp(torch.exp(signed), 1.0 - eps, 1.0 + eps)
        released = a * torch.where(mask, (1.0 - lam) + lam * w, torch.ones_like(w)).to(a.dtype)
        out, _ = serl_reweight(a, teacher, old, mask, lam, eps)
        assert torch.equal(out, released), (lam, eps)


def test_rule_through_the_registered_estimator_logs_the_sign_flips():
    rewards, mask, index = _batch()
    base = torch.tensor([[1.0] * 3, [-1.0] * 3, [0.0] * 3, [0.0] * 3])
    teacher = torch.tensor([[-4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0] * 3])
    hmask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
    metrics = {}
    cfg = _config(credit_rule="additive", additive_beta=0.5, mixing_lambda=1.0, lambda_decay_steps=None)
    adv, _ = compute_serl_advantage(rewards, mask, index, cfg, teacher_log_probs=teacher,
                                    old_log_probs=torch.zeros(4, 3), hindsight_mask=hmask, updates_done=10_000,
                                    base_advantages=base, metrics=metrics)
    # constant lambda 1 after 10k updates: A + 0.5 d -> (1 - 2, 1 + 0), (-1 + 2), (0 + 0.5)
    assert adv[0, :2].tolist() == [-1.0, 1.0] and adv[1, 0].item() == 1.0 and adv[2, 0].item() == 0.5
    assert torch.equal(adv[:, 2], base[:, 2]) and torch.equal(adv[3], base[3])
    assert metrics["serl/sign_flipped_frac"] == pytest.approx(2 / 4)  # tokens (0, 0) and (1, 0) of four targeted
    assert metrics["serl/lambda"] == 1.0
    assert metrics["serl/changed_tokens"] == 3 and metrics["serl/changed_tokens_outside_hindsight_mask"] == 0


def test_weight_clip_one_is_the_range_zero_to_two():
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    teacher = torch.tensor([[3.0, -3.0, -0.5]])  # sign(A) d = 3, -3, 0.5
    w = serl_weights(adv, teacher, torch.zeros_like(adv), weight_clip=1.0)
    assert w[0].tolist() == pytest.approx([2.0, E(-3.0), E(0.5)], rel=1e-6)  # capped at 2; nothing reaches 0
    assert SERLConfig(weight_clip=1.0).weight_clip == 1.0


def test_lambda_without_decay_is_constant():
    cfg = SERLConfig(lambda_decay_steps=None, mixing_lambda=0.5)
    assert [cfg.mixing(k) for k in (0, 50, 10**6)] == [0.5, 0.5, 0.5]
    # the trainer skips the teacher pass only when the mixing weight is 0: never with a constant lambda > 0
    assert SERLConfig(lambda_decay_steps=None, mixing_lambda=0.0).mixing(0) == 0.0


def test_credit_rule_settings_errors_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"algorithm.serl.credit_rule must be one of \('serl', 'rlsd', 'additive'\)"):
        SERLConfig(credit_rule="craft")
    with pytest.raises(ValueError, match="algorithm.serl.weight_clip applies to credit_rule=serl only"):
        SERLConfig(credit_rule="rlsd", weight_clip=1.0)
    with pytest.raises(ValueError, match="algorithm.serl.additive_beta applies to credit_rule=additive only"):
        SERLConfig(additive_beta=2.0)
    with pytest.raises(ValueError, match="algorithm.serl.additive_beta must be > 0"):
        SERLConfig(credit_rule="additive", additive_beta=0.0)
    with pytest.raises(ValueError, match="algorithm.serl.lambda_decay_steps must be >= 1, or null"):
        SERLConfig(lambda_decay_steps=0)
    with pytest.raises(ValueError, match=r"algorithm.serl.weight_clip must be in \[0, 1\]"):
        SERLConfig(weight_clip=1.01)
    cfg = load_serl_config(OmegaConf.create({"serl": {"credit_rule": "additive", "additive_beta": 2.0,
                                                      "lambda_decay_steps": None}}))
    assert (cfg.credit_rule, cfg.additive_beta, cfg.lambda_decay_steps) == ("additive", 2.0, None)
