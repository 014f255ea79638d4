"""The pretrained google/gemma-3-270m through stock main_ppo on CPU: HINT-SD on the toy's text loop, the policy as
its own analyzer, for one step (CI-sized; the recipe's two steps are in the benchmark). Every method on the toy and
on BFCL's tool loop, with each phase's time and peak memory: benchmarks/pretrained_training.py and
docs/pretrained.md (a BFCL step costs 10+ minutes here, so the tool loop's real-length check in CI is `lift` on
BFCL, tests/e2e/test_gemma_pretrained.py).

A base model of this size does not write the toy's ``<action>`` tags, so no turn carries an action to credit and the
update leaves the weights where they are; what must hold is the pipeline on a real tokenizer and template: prompts
rendered by the project's Gemma template, the analyzer asked about every failed episode with every answer accounted
for, and finite metrics.
"""

from __future__ import annotations

import math

import pytest

from conftest_e2e import run_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("gemma")]


def _prompt_length(gemma_dir, messages) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _finite(metrics: dict) -> None:
    for k, v in metrics.items():
        if k.startswith(("hindsight/", "actor/", "timing_s/")) and isinstance(v, (int, float)):
            assert math.isfinite(float(v)), k


def test_hint_sd_with_the_model_as_analyzer_on_the_toy(gemma_dir, tmp_path):
    from verl_hindsight.agent_loops.prompts import initial_messages
    from verl_hindsight.environment.data import write_env_dataset
    from verl_hindsight.environment.protocol import make_env

    train, val = write_env_dataset("toy", tmp_path / "data", max_train=2, max_val=1)
    metrics = run_recipe("cpu/pretrained_toy_hint_sd", tmp_path, [
        f"actor_rollout_ref.model.path={gemma_dir}", f"data.train_files={train}", f"data.val_files={val}",
        # short answers: the cost of a real 262k vocabulary shows at any length, and the CI budget is minutes
        "data.max_response_length=32", "hindsight.analyzer.max_tokens=32", "trainer.total_training_steps=1",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}"])
    assert [m["training/global_step"] for m in metrics if "timing_s/step" in m] == [1]
    env = make_env("toy")
    first = env.reset(env.task_ids("train")[0]).text
    prompt = _prompt_length(gemma_dir, initial_messages(env.instructions, first))
    for m in metrics:
        if "timing_s/step" not in m:
            continue
        _finite(m)
        assert m["hindsight/rows"] == 2
        assert m["prompt_length/mean"] == prompt  # the project's Gemma template, rendered by verl's builder
        failed = 2 * (1 - m["hindsight/env_success"])
        assert m["hindsight/analyzer_calls"] == failed  # the policy reads every failed episode
        assert sum(v for k, v in m.items() if k.startswith("hindsight/analyzer_failure/")) == \
            m["hindsight/analyzer_parse_failures"] + m.get("hindsight/analyzer_failure/answer_error", 0.0)
