"""SERL, HINT-SD and HERO through stock ``main_ppo`` on CPU (toy environment, tiny format-warm-started model).

The default toy recipes run in test_demo_quick.py, moving teachers at one and two ranks (resume included) in
test_two_ranks_cpu.py, and the policy as its own analyzer with the pretrained model in test_gemma_training.py; this
file holds the settings no other run covers.
"""

import http.server
import json
import math
import threading

import pytest

from verl_hindsight.environment.data import write_env_dataset

from conftest_e2e import base_model_probe, probe_gap_per_token, run_recipe

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_env_dataset("toy", tmp_path_factory.mktemp("toy_data"), max_train=16, max_val=4)


def _base(format_model, data, tmp_path, steps=2):
    train, val = data
    return [f"actor_rollout_ref.model.path={format_model}", f"data.train_files={train}", f"data.val_files={val}",
            f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={tmp_path / 'ckpt'}"]


def _finite(rows, prefix):
    keys = {k for m in rows for k in m if k.startswith(prefix)}
    assert keys, f"no {prefix}* metrics"
    for m in rows:
        for k in keys & set(m):
            assert math.isfinite(float(m[k])), (k, m[k])
    return keys


class _Judge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that judges like a careful reader: it takes the outcome from the rendered
    episode it is sent. Its first answer is a 429, so the run also goes through the client's retry."""

    episodes: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        episode = body["messages"][-1]["content"]
        type(self).episodes.append(episode)
        if len(type(self).episodes) == 1:
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        summary = ("This rollout succeeded. Keep pressing the key the hint names." if "Final outcome: success" in
                   episode else "This rollout failed. Press the key that the environment's hint names.")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": summary}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_url():
    handler = type("Judge", (_Judge,), {"episodes": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_serl_with_the_judge_source_on_another_base_estimator(format_model, data, tmp_path, judge_url):
    """SERL's fifth feedback source in training: an LLM judge behind an OpenAI-compatible endpoint summarises every
    episode at its end (agent loop), the summary is the teacher's hindsight on every action turn. One run also
    covers algorithm.serl.base_estimator=rloo: verl's RLOO advantage, reweighted by the same registered
    estimator."""
    handler, url = judge_url
    rows = run_recipe("cpu/toy_serl", tmp_path, _base(format_model, data, tmp_path) + [
        "algorithm.serl.base_estimator=rloo", "hindsight.feedback.source=judge", "hindsight.analyzer.role=judge",
        "hindsight.analyzer.client=openai", f"hindsight.analyzer.base_url={url}", "hindsight.analyzer.model=judge",
        "hindsight.analyzer.retry_backoff_s=0.01"])
    assert len(rows) == 2
    _finite(rows, "serl/")
    for m in rows:
        assert m["hindsight/stage_active"] == 1.0
        # every episode of the step, successes included; one without a single action turn has nothing to judge
        assert m["hindsight/judge_calls"] + m["hindsight/judge_skipped"] == 16 and m["hindsight/judge_calls"] > 0
        assert m["hindsight/judge_parse_failures"] == 0 and m["hindsight/judge_failure/answer_error"] == 0
        assert m["hindsight/feedback_coverage"] == 1.0  # the summary reaches every action turn
        assert m["serl/changed_tokens_outside_hindsight_mask"] == 0.0
        assert m["serl/changed_tokens"] <= m["serl/hindsight_tokens"]
        assert 0.8 - 1e-6 <= m["serl/weight_mean"] <= 1.2 + 1e-6  # clip(exp(sign(A) d), 1 - eps, 1 + eps)
    assert any(m["serl/changed_tokens"] > 0 for m in rows)
    # one request per judged episode, plus the one answered with a 429
    assert len(handler.episodes) == sum(m["hindsight/judge_calls"] for m in rows) + 1
    assert all("Final outcome:" in e and "Step 1:" in e for e in handler.episodes)


def test_hero_reflects_through_the_rollout_server(format_model, data, tmp_path):
    rows = run_recipe("cpu/toy_hero", tmp_path, _base(format_model, data, tmp_path))
    _finite(rows, "hindsight/")
    for m in rows:
        assert m["hindsight/reflector_calls"] == 16  # HERO reflects on every episode
        assert m["hindsight/reflector_parse_failures"] <= 16


def test_serl_config_without_the_stage_fails_fast_with_the_fix(format_model, data, tmp_path):
    rc, log = run_recipe("cpu/toy_serl", tmp_path, _base(format_model, data, tmp_path) + ["hindsight.enable=false"],
                         expect_ok=False)
    assert rc != 0 and "hindsight.enable=true" in log


def test_hindsight_settings_under_verl_s_own_trainer_are_refused_before_any_update(format_model, data, tmp_path):
    """HINT-SD's settings with verl's sync trainer would train plain GRPO; the first episode refuses the run (verl
    logs the agent loop's error and stops at its replay buffer, before any update)."""
    rc, log = run_recipe("cpu/toy_hint_sd", tmp_path, _base(format_model, data, tmp_path) + [
        "trainer.v1.trainer_mode=sync"], expect_ok=False)
    assert rc != 0
    assert "only the plugin's trainer applies these, and trainer.v1.trainer_mode=sync; set " \
           "trainer.v1.trainer_mode=hindsight" in log, log[-3000:]
    assert "hindsight.distill.coef=1.0" in log and "hindsight.feedback.source=error" in log  # what it would ignore
    assert "step:1 " not in log  # no update happened


def test_lagged_teacher_as_the_kl_anchor_moves_the_anchor(format_model, data, tmp_path):
    """kl_anchor=teacher (SERL's released code): the reference model is the teacher, so the anchor follows it."""
    overrides = _base(format_model, data, tmp_path, steps=3) + [
        "hindsight.teacher.sync_interval=1", "hindsight.teacher.log_probe=true", "hindsight.teacher.kl_anchor=teacher"]
    rows = run_recipe("cpu/toy_serl", tmp_path, overrides)
    for m in rows:
        assert m["hindsight/reference_probe_logprob"] == m["hindsight/teacher_probe_logprob"]
    assert rows[0]["hindsight/teacher_update_mean_abs"] > 0  # synced after every update
    assert rows[2]["hindsight/reference_probe_logprob"] != rows[0]["hindsight/reference_probe_logprob"]
    log = (tmp_path / "verl.log").read_text()
    assert "kl_anchor=teacher: the KL to the reference follows the lagged teacher" in log


def test_without_a_kl_term_the_moving_teacher_takes_the_reference_models_place(format_model, data, tmp_path):
    """Every GPU recipe runs without a KL term: the reference engine then holds the teacher itself (no second copy
    of the weights), and it must move, not stay the warm start that a KL anchor would be. HINT-SD's EMA teacher
    here; SERL's lagged teacher without a KL term runs in test_two_ranks_cpu.py."""
    overrides = _base(format_model, data, tmp_path) + [
        "hindsight.teacher.kind=ema", "hindsight.teacher.ema_decay=0.5",
        "actor_rollout_ref.actor.use_kl_loss=false", "hindsight.teacher.log_probe=true"]
    rows = run_recipe("cpu/toy_hint_sd", tmp_path, overrides)
    assert len(rows) == 2
    assert not any(k.startswith("actor/kl") for m in rows for k in m)  # no KL term ran
    for m in rows:
        # one engine: what scores as the reference is the teacher, and it holds no weights of its own
        assert m["hindsight/reference_probe_logprob"] == m["hindsight/teacher_probe_logprob"]
        assert m["hindsight/teacher_state_bytes"] == 0.0
        assert m["hindsight/targeted_tokens"] > 0
    # step 1's teacher is the warm start (scored in fp32 like a plain transformers forward); after the update it moved
    assert probe_gap_per_token(rows[0]["hindsight/teacher_probe_logprob"], base_model_probe(format_model)) < 1e-5
    assert rows[0]["hindsight/teacher_update_mean_abs"] > 0
    assert probe_gap_per_token(rows[1]["hindsight/teacher_probe_logprob"],
                               rows[0]["hindsight/teacher_probe_logprob"]) > 1e-4
