"""The viewer's per-token records of a SERL-step run: the factor a credit rule applied, undefined where the outcome's
advantage is 0, and the tokens whose sign it flipped; checked against hand-computed values on a real tokenizer."""

import math

import pytest

from verl_hindsight.report.viewer import _hindsight_record
from verl_hindsight.trainer.dump import token_records


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_credit_factor_and_sign_flips_per_targeted_token(tokenizer):
    ids = tokenizer.encode("<action>C</action>", add_special_tokens=False)[:4]
    assert len(ids) == 4
    targeted = [0, 1, 1, 1]
    base = [0.5, 0.5, -0.5, 0.0]
    # token 1: weighted up (0.5 -> 0.6); token 2: flipped (-0.5 -> 0.3); token 3: additive credit in a
    # zero-advantage group (0 -> 0.2); token 0 is not targeted, so it carries no SERL values
    credited = [0.5, 0.6, 0.3, 0.2]
    old, teacher = [-1.0] * 4, [math.nan, -0.5, -2.0, -1.2]
    recs = token_records(tokenizer, ids, [0, 1, 1, 1], targeted, old, teacher, credited, base)

    assert [r["base_advantage"] for r in recs] == [None, 0.5, -0.5, 0.0]
    assert [r["serl_weight"] for r in recs] == [None, pytest.approx(1.2), pytest.approx(-0.6), None]
    assert [r["flipped"] for r in recs] == [0, 0, 1, 0]
    assert [r["gap"] for r in recs] == [None, pytest.approx(0.5), pytest.approx(-1.0), pytest.approx(-0.2)]
    assert "".join(r["text"] for r in recs) == tokenizer.decode(ids)

    page = _hindsight_record({"tokens": recs, "turns": []}, "additive-s0", "weight")
    assert page.count("flip") == 1
    assert "advantage 0.300 (outcome&#x27;s -0.500)" in page


def test_runs_without_the_serl_step_carry_no_credit_values(tokenizer):
    ids = tokenizer.encode("<action>C</action>", add_special_tokens=False)[:2]
    recs = token_records(tokenizer, ids, [1, 1], [1, 1], [-1.0, -1.0], [-0.5, -0.5], [0.5, 0.5], None)
    assert all(r["serl_weight"] is None and r["base_advantage"] is None and r["flipped"] == 0 for r in recs)
