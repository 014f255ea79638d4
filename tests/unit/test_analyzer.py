"""HINT-SD analyzer / HERO reflector: rendering, strict parsing, batch runs and the answering clients."""

import asyncio
import http.server
import json
import threading
import time

import pytest

from verl_hindsight.hindsight.analyzer import (
    CLIP_MARKER,
    AnswerError,
    OpenAICompatibleClient,
    RolloutServerAnswer,
    analyzer_messages,
    arun_analyzer,
    extract_json_object,
    parse_analyzer_answer,
    parse_reflector_answer,
    reflector_messages,
    render_trajectory,
    run_analyzer,
    run_reflector,
)
from verl_hindsight.hindsight.records import Trajectory, TurnRecord


def turn(i, action="go north", obs=None, feedback=None, error=None, reward=0.0, done=False):
    obs = obs if obs is not None else f"room {i}"
    return TurnRecord(
        turn=i, response_span=(0, 1), has_action=bool(action), action=action, observation=obs,
        anchor=obs, feedback=feedback if feedback is not None else (error or f"room {i + 1}"), error=error,
        next_observation=f"room {i + 1}", reward=reward, done=done, invalid_action=error is not None,
    )


def traj(n=3, success=False, uid="u", failure="", first_obs="Task: find the key. You are in room 0."):
    turns = [turn(0, obs=first_obs)] + [turn(i) for i in range(1, n)]
    return Trajectory(uid=uid, turns=tuple(turns), success=success, episode_return=1.0 if success else 0.0,
                      task_id="t1", env="toy", failure=failure)


def fa(*pairs):
    return json.dumps({"failures": [{"step": s, "feedback": f} for s, f in pairs]}, ensure_ascii=False)


# ------------------------------------------------------------------ rendering


def test_render_is_deterministic_and_complete():
    t = traj(3)
    a, b = render_trajectory(t), render_trajectory(t)
    assert a == b
    assert "Task: find the key" in a and "Step 1:" in a and "Step 3:" in a and "Step 4:" not in a
    assert "Action: go north" in a and "Environment answer: room 1" in a and "Reward: 0" in a
    assert a.rstrip().endswith("Final outcome: failure | return 0 | 3 steps")
    # the observation of step 2 repeats step 1's answer: not repeated
    assert a.count("room 1") == 1


def test_render_shows_errors_and_missing_actions():
    t = Trajectory(uid="u", turns=(turn(0, action=None, error="Unknown command"),), success=False,
                   episode_return=0.0)
    text = render_trajectory(t)
    assert "Action: (no valid action)" in text and "Environment error: Unknown command" in text


def test_render_clips_from_the_start_and_keeps_the_end():
    t = traj(200)
    full = render_trajectory(t, max_chars=10**9)
    clipped = render_trajectory(t, max_chars=1000)
    assert len(full) > 1000 and len(clipped) == 1000
    assert clipped.startswith(CLIP_MARKER)
    assert full.endswith(clipped[len(CLIP_MARKER):])
    assert "Final outcome" in clipped and "Step 200:" in clipped and "Step 1:" not in clipped


def test_render_clips_a_huge_single_field():
    t = traj(2, first_obs="x" * 50_000)
    text = render_trajectory(t, max_chars=10**9, field_chars=500)
    assert len(text) < 2000 and "[... clipped ...]" in text


def test_messages_shapes():
    t = traj(3)
    for msgs in (analyzer_messages(t, k=2), analyzer_messages(t, variant="single"), reflector_messages(t)):
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert "Step 1:" in msgs[1]["content"]
    assert "at most 2 steps" in analyzer_messages(t, k=2)[0]["content"]
    assert "FIRST" in analyzer_messages(t, variant="single")[0]["content"]
    assert '"corrected_action"' in reflector_messages(t)[0]["content"]
    with pytest.raises(ValueError):
        analyzer_messages(t, variant="both")


# ------------------------------------------------------------------ analyzer parsing: valid


@pytest.mark.parametrize("wrap", [
    lambda j: j,
    lambda j: f"```json\n{j}\n```",
    lambda j: f"Here is my analysis {{of sorts}}: maybe.\n{j}\nHope this helps }}",
    lambda j: f"Sure!\n```\n{j}\n```\nDone.",
])
def test_valid_answers_in_wrappers(wrap):
    r = parse_analyzer_answer(wrap(fa((3, "Open the door first."), (1, "Read the task."))), n_steps=3, k=3)
    assert r.ok and r.failure is None and r.notes == ()
    assert r.steps == ((0, "Read the task."), (2, "Open the door first."))  # 0-based, earliest first


def test_nested_braces_escaped_quotes_and_unicode_inside_strings():
    fb = 'Call {\\"name\\": \\"open\\", \\"args\\": {\\"door\\": \\"n}\\"}} and say \\\\ \\"hi\\" — ünïcødé ✓ {'
    text = '{"failures": [{"step": 2, "feedback": "' + fb + '"}], "note": {"x": [1, {"y": "}"}]}}'
    r = parse_analyzer_answer(text, n_steps=2, k=3)
    assert r.ok
    assert r.steps == ((1, json.loads('"' + fb + '"')),)


def test_feedback_is_stripped_and_clipped():
    r = parse_analyzer_answer(fa((1, "  " + "a" * 1000 + "  ")), n_steps=1, k=3, max_text_chars=600)
    assert r.ok and r.steps[0][1] == "a" * 600 and r.notes == ("clipped",)


def test_more_than_k_keeps_the_earliest_k_and_is_noted():
    r = parse_analyzer_answer(fa((4, "d"), (2, "b"), (1, "a"), (3, "c")), n_steps=4, k=2)
    assert r.ok and r.steps == ((0, "a"), (1, "b")) and r.notes == ("too_many",)


def test_extra_keys_are_ignored():
    text = json.dumps({"failures": [{"step": 1, "feedback": "x", "why": "y"}], "summary": "s"})
    assert parse_analyzer_answer(text, n_steps=1, k=1).steps == ((0, "x"),)


# ------------------------------------------------------------------ analyzer parsing: rejected, never raised


@pytest.mark.parametrize("text,reason", [
    ("no json here", "invalid_json"),
    ("", "invalid_json"),
    ('{"failures": [{"step": 1, "feedback": "x"}]', "invalid_json"),  # unbalanced
    ('{"failures": [{"step": 1, "feedback": "x",}]}', "invalid_json"),  # trailing comma
    ("{'failures': [{'step': 1, 'feedback': 'x'}]}", "invalid_json"),  # Python literal
    ("{'step': 1}", "invalid_json"),
    ('[{"step": 1, "feedback": "x"}]', "invalid_json"),  # an array, not an object
    ('{"failures": [{"step": NaN, "feedback": "x"}]}', "invalid_json"),
    ('{"failures": null}', "schema"),
    ('{"failures": "step 1"}', "schema"),
    ('{"steps": [{"step": 1, "feedback": "x"}]}', "schema"),
    ('{"failures": [{"feedback": "x"}]}', "schema"),
    ('{"failures": [{"step": 1}]}', "schema"),
    ('{"failures": [{"step": "1", "feedback": "x"}]}', "schema"),
    ('{"failures": [{"step": 1.0, "feedback": "x"}]}', "schema"),
    ('{"failures": [{"step": true, "feedback": "x"}]}', "schema"),
    ('{"failures": [{"step": 1, "feedback": 3}]}', "schema"),
    ('{"failures": [1, 2]}', "schema"),
    ('{"failures": []}', "empty"),
    ('{"failures": [{"step": 1, "feedback": "   "}]}', "empty"),
    ('{"failures": [{"step": 0, "feedback": "x"}]}', "out_of_range"),  # steps are 1-based
    ('{"failures": [{"step": 4, "feedback": "x"}]}', "out_of_range"),
    ('{"failures": [{"step": -1, "feedback": "x"}]}', "out_of_range"),
    ('{"failures": [{"step": 1, "feedback": "x"}, {"step": 9, "feedback": "y"}]}', "out_of_range"),
    ('{"failures": [{"step": 2, "feedback": "x"}, {"step": 2, "feedback": "y"}]}', "duplicate_step"),
])
def test_rejected_answers(text, reason):
    r = parse_analyzer_answer(text, n_steps=3, k=3)
    assert not r.ok and r.failure == reason and r.steps == ()


def test_broken_outer_object_is_not_replaced_by_an_inner_fragment():
    text = "{'failures': [{\"step\": 1, \"feedback\": \"x\"}]}"
    assert parse_analyzer_answer(text, n_steps=3, k=3).failure == "invalid_json"


def test_a_later_object_is_used_when_the_first_is_not_json():
    text = "Template: {step: k} then the answer " + fa((2, "ok"))
    assert parse_analyzer_answer(text, n_steps=3, k=3).steps == ((1, "ok"),)


def test_adversarial_inputs_do_not_raise():
    deep = "{" + '"a":{' * 50_000 + "}" * 50_001
    assert parse_analyzer_answer(deep, 3, 3).failure == "invalid_json"
    unclosed = '{"failures": [' * 100_000
    assert parse_analyzer_answer(unclosed, 3, 3).failure == "invalid_json"
    long_prose = "blah " * 200_000 + fa((1, "x"))  # beyond the scan budget
    t0 = time.monotonic()
    assert parse_analyzer_answer(long_prose, 3, 3).failure == "invalid_json"
    long_fb = fa((1, "é" * 50_000))
    r = parse_analyzer_answer(long_fb, 3, 3)
    assert r.ok and len(r.steps[0][1]) == 600 and "clipped" in r.notes
    assert time.monotonic() - t0 < 5
    assert parse_analyzer_answer(None, 3, 3).failure == "invalid_json"
    assert parse_analyzer_answer("\x00\ud800{}", 3, 3).failure == "schema"


def test_extract_json_object_skips_non_objects():
    assert extract_json_object('x {"a": "}{"} y') == {"a": "}{"}
    assert extract_json_object("[1, 2]") is None
    assert extract_json_object('steps [1, 3] (see [note) were wrong: {"a": [1]}') == {"a": [1]}
    assert extract_json_object('[{"a": 1}] then {"b": 2}') == {"b": 2}
    assert extract_json_object("[" * 100_000 + '{"a": 1}') is None  # bounded work, no crash


# ------------------------------------------------------------------ reflector parsing


def rt(step, diagnosis="", necessary=True, valid=True, corrected=None):
    return {"step": step, "necessary": necessary, "valid": valid, "diagnosis": diagnosis,
            "corrected_action": corrected}


def test_reflector_valid_keeps_only_non_empty_diagnoses():
    text = "```json\n" + json.dumps({"turns": [rt(3, "Wrong door.", True, False, "open north door"), rt(1),
                                               rt(2, " Detour. ", False, True, "  ")]}) + "\n```"
    r = parse_reflector_answer(text, n_steps=3)
    assert r.ok
    assert [(d.turn, d.necessary, d.valid, d.diagnosis, d.corrected_action) for d in r.turns] == [
        (1, False, True, "Detour.", None),
        (2, True, False, "Wrong door.", "open north door"),
    ]


def test_reflector_corrected_action_is_optional():
    r = parse_reflector_answer(json.dumps({"turns": [{"step": 1, "necessary": True, "valid": False,
                                                      "diagnosis": "bad"}]}), n_steps=1)
    assert r.ok and r.turns[0].corrected_action is None


def test_reflector_all_fine_is_valid_but_empty():
    r = parse_reflector_answer(json.dumps({"turns": [rt(1), rt(2)]}), n_steps=2)
    assert r.ok and r.turns == ()


@pytest.mark.parametrize("answer,reason", [
    ("nope", "invalid_json"),
    ({"turns": []}, "empty"),
    ({"turns": None}, "schema"),
    ({"turns": [{"step": 1, "necessary": True, "diagnosis": "x"}]}, "schema"),  # missing key
    ({"turns": [rt(1, "x") | {"necessary": "yes"}]}, "schema"),
    ({"turns": [rt(1, "x") | {"diagnosis": None}]}, "schema"),
    ({"turns": [rt(1, "x", corrected=5)]}, "schema"),
    ({"turns": [rt("1", "x")]}, "schema"),
    ({"turns": [rt(4, "x")]}, "out_of_range"),
    ({"turns": [rt(1, "x"), rt(1, "y")]}, "duplicate_step"),
])
def test_reflector_rejected(answer, reason):
    text = answer if isinstance(answer, str) else json.dumps(answer)
    r = parse_reflector_answer(text, n_steps=3)
    assert r.failure == reason and r.turns == ()


# ------------------------------------------------------------------ batch runs


def batch():
    return [
        traj(3, success=False, uid="a"),        # 0: valid answer
        traj(3, success=True, uid="a"),         # 1: success -> skipped
        traj(2, success=False, uid="b"),        # 2: out-of-range answer
        traj(3, success=False, failure="env crashed"),  # 3: env failure -> skipped
        traj(3, success=False, uid="c"),        # 4: answer_fn raises
        traj(3, success=False, uid="d"),        # 5: too many
        traj(3, success=False, uid="e"),        # 6: invalid json
    ]


ANSWERS = {
    "a": fa((2, "Pick up the key.")),
    "b": fa((3, "x")),
    "d": fa((3, "c"), (1, "a"), (2, "b")),
    "e": "I think step 2 was wrong.",
}


def fake_answer(calls):
    def answer(messages):
        calls.append(messages)
        uid = next(u for u in "abcde" if f"uid={u}" in messages[1]["content"])
        if uid == "c":
            raise ConnectionError("endpoint down")
        return ANSWERS[uid]
    return answer


def tagged(trajs):
    # the uid is not rendered; tag the task id so the fake model can tell trajectories apart
    return [Trajectory(uid=t.uid, turns=t.turns, success=t.success, episode_return=t.episode_return,
                       task_id=f"uid={t.uid}", env=t.env, failure=t.failure) for t in trajs]


def check_analyzer_outcome(out, m, calls):
    assert len(calls) == 5
    assert out == {0: [(1, "Pick up the key.")], 5: [(0, "a"), (1, "b")]}
    assert m["hindsight/analyzer_calls"] == 5
    assert m["hindsight/analyzer_skipped"] == 2
    assert m["hindsight/analyzer_parse_failures"] == 2
    assert m["hindsight/analyzer_failure/out_of_range"] == 1
    assert m["hindsight/analyzer_failure/invalid_json"] == 1
    assert m["hindsight/analyzer_failure/answer_error"] == 1
    assert m["hindsight/analyzer_failure/duplicate_step"] == 0
    assert m["hindsight/analyzer_too_many"] == 1
    assert m["hindsight/analyzer_steps_selected"] == 3


def test_run_analyzer_only_failed_with_exact_metrics():
    calls = []
    out, m = run_analyzer(tagged(batch()), fake_answer(calls), k=2)
    check_analyzer_outcome(out, m, calls)


def test_run_analyzer_async_answer_fn_and_inside_a_running_loop():
    calls = []
    sync = fake_answer(calls)

    async def answer(messages):
        await asyncio.sleep(0)
        return sync(messages)

    out, m = run_analyzer(tagged(batch()), answer, k=2)
    check_analyzer_outcome(out, m, calls)

    async def from_loop():  # the sync entry point also works where an event loop is running
        calls.clear()
        return run_analyzer(tagged(batch()), answer, k=2), await arun_analyzer(tagged(batch()), answer, k=2)

    (out1, m1), (out2, m2) = asyncio.run(from_loop())
    assert out1 == out2 == out and m1 == m2 == m


def test_run_analyzer_all_trajectories_and_single_variant():
    calls = []

    def answer(messages):
        calls.append(messages)
        return fa((3, "c"), (1, "a"))

    out, m = run_analyzer([traj(3, success=True), traj(3)], answer, variant="single", only_failed=False)
    assert out == {0: [(0, "a")], 1: [(0, "a")]} and m["hindsight/analyzer_too_many"] == 2
    assert all("FIRST" in c[0]["content"] for c in calls)


def test_run_analyzer_maps_positions_to_turn_numbers():
    t = traj(2)
    t = Trajectory(uid="u", turns=tuple(TurnRecord(**{**x.__dict__, "turn": x.turn + 10}) for x in t.turns),
                   success=False, episode_return=0.0)
    out, _ = run_analyzer([t], lambda m: fa((2, "x")))
    assert out == {0: [(11, "x")]}


def test_run_reflector_metrics():
    answers = [json.dumps({"turns": [rt(1), rt(2, "Should have opened the door.", corrected="open door")]}),
               json.dumps({"turns": [rt(1), rt(2)]}),
               json.dumps({"turns": [rt(1, "x"), rt(1, "y")]})]
    trajs = [traj(2, success=True, uid="0"), traj(2, uid="1"), traj(2, uid="2"), traj(2, failure="boom"),
             traj(2, uid="3")]
    it = iter(answers + ["raise"])

    def answer(messages):
        a = next(it)
        if a == "raise":
            raise TimeoutError("slow")
        return a

    out, m = run_reflector(trajs, answer, concurrency=1)  # successes included by default
    assert list(out) == [0]
    [d] = out[0]
    assert (d.turn, d.diagnosis, d.corrected_action) == (1, "Should have opened the door.", "open door")
    assert m["hindsight/reflector_calls"] == 4 and m["hindsight/reflector_skipped"] == 1
    assert m["hindsight/reflector_parse_failures"] == 1
    assert m["hindsight/reflector_failure/duplicate_step"] == 1
    assert m["hindsight/reflector_failure/answer_error"] == 1
    assert m["hindsight/reflector_steps_selected"] == 1

    out, m = run_reflector(trajs, lambda msgs: answers[0], only_failed=True)
    assert list(out) == [1, 2, 4] and m["hindsight/reflector_calls"] == 3


# ------------------------------------------------------------------ OpenAI-compatible client


class _Handler(http.server.BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []
    fail_first = 0  # with mode "flaky": answer this many requests with fail_code (and Retry-After: 0), then ok
    fail_code = 429

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "flaky" and len(type(self).seen) <= self.fail_first:
            self.send_response(self.fail_code)
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(b"slow down")
            return
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"internal kaboom")
            return
        payload = {"choices": [{"message": {"role": "assistant", "content": fa((1, "Look first."))}}]}
        if self.mode == "bad":
            payload = {"error": "nope"}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass


@pytest.fixture
def server():
    handler = type("H", (_Handler,), {"seen": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    yield handler, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_openai_client_success(server):
    handler, url = server
    client = OpenAICompatibleClient(url + "/", "judge", api_key="sk-test", timeout_s=5, max_tokens=64,
                                    temperature=0.0)
    out, m = run_analyzer([traj(2)], client)
    assert out == {0: [(0, "Look first.")]} and m["hindsight/analyzer_calls"] == 1
    path, auth, body = handler.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge" and body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert [x["role"] for x in body["messages"]] == ["system", "user"]


def test_openai_client_http_error_names_the_url(server):
    handler, url = server
    handler.mode = "500"
    client = OpenAICompatibleClient(url, "judge", timeout_s=5, retries=2, retry_backoff_s=0.01)
    with pytest.raises(AnswerError, match=r"127\.0\.0\.1.*/v1/chat/completions.*HTTP 500.*kaboom"):
        client([{"role": "user", "content": "hi"}])
    assert len(handler.seen) == 3 and client.attempts == 3  # asked again twice, then given up
    _, m = run_analyzer([traj(2)], client)
    assert m["hindsight/analyzer_failure/answer_error"] == 1


@pytest.mark.parametrize("code", [429, 503])
def test_openai_client_retries_rate_limits_and_server_errors(server, code):
    handler, url = server
    handler.mode, handler.fail_first, handler.fail_code = "flaky", 2, code
    client = OpenAICompatibleClient(url, "judge", timeout_s=5, retries=3, retry_backoff_s=30.0)
    out, m = run_analyzer([traj(2)], client)  # Retry-After: 0 wins over the 30 s backoff
    assert out == {0: [(0, "Look first.")]} and m["hindsight/analyzer_failure/answer_error"] == 0
    assert client.attempts == 3 and len(handler.seen) == 3


def test_openai_client_does_not_retry_a_bad_request(server):
    handler, url = server
    handler.mode, handler.fail_first, handler.fail_code = "flaky", 5, 401
    client = OpenAICompatibleClient(url, "judge", timeout_s=5, retries=3, retry_backoff_s=0.01)
    with pytest.raises(AnswerError, match="HTTP 401"):
        client([{"role": "user", "content": "hi"}])
    assert client.attempts == 1  # a wrong key fails the same way every time


def test_openai_client_bad_payload(server):
    handler, url = server
    handler.mode = "bad"
    with pytest.raises(AnswerError, match="no chat completion"):
        OpenAICompatibleClient(url, "judge", timeout_s=5, retries=0)([{"role": "user", "content": "hi"}])


def test_openai_client_timeout_names_the_url(server):
    handler, url = server
    handler.mode = "slow"
    client = OpenAICompatibleClient(url, "judge", timeout_s=0.2, retries=1, retry_backoff_s=0.01)
    with pytest.raises(AnswerError, match=r"127\.0\.0\.1.*did not answer within 0\.2s"):
        client([{"role": "user", "content": "hi"}])
    assert client.attempts == 2


def test_openai_client_unreachable_names_the_url():
    client = OpenAICompatibleClient("http://127.0.0.1:9/v1", "judge", timeout_s=2, retries=0)
    with pytest.raises(AnswerError, match=r"127\.0\.0\.1:9/v1/chat/completions"):
        client([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------ rollout-server answer with the tiny model


def test_rollout_server_answer_with_tiny_model(tiny_model_and_tokenizer):
    from verl_hindsight.rollout.hf_generation import BatchedGenerator, build_request

    model, tok = tiny_model_and_tokenizer
    gen = BatchedGenerator(model, pad_token_id=tok.pad_token_id, tokenizer=tok)
    seen = []

    class Manager:  # verl's server_manager contract: async generate(request_id=, prompt_ids=, sampling_params=)
        async def generate(self, *, request_id, prompt_ids, sampling_params):
            seen.append((request_id, len(prompt_ids), sampling_params))
            req = build_request(prompt_ids, sampling_params, max_model_len=4096, response_length=16,
                                prompt_length=4096, eos_token_ids=frozenset([tok.eos_token_id]),
                                vocab_size=len(tok))
            return gen.run([req])[0]

    answer = RolloutServerAnswer.from_server_manager(
        tok, Manager(), sampling_params={"temperature": 0.0, "max_tokens": 16})
    t = traj(2)
    msgs = analyzer_messages(t, max_chars=800)
    text = asyncio.run(answer.answer(msgs))
    assert isinstance(text, str)
    expected_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
    assert seen[0][1] == len(expected_ids) and seen[0][0].startswith("hs-analyzer-")

    out, m = run_analyzer([t], answer, max_chars=800)  # gibberish: a counted failure, not an exception
    assert out == {} and m["hindsight/analyzer_calls"] == 1 and m["hindsight/analyzer_parse_failures"] == 1

    # a plain sync generate returning token ids also works; too long prompts are a counted answer_error
    plain = RolloutServerAnswer(tok, lambda ids, sp: [tok.eos_token_id], max_prompt_tokens=10)
    _, m = run_analyzer([t], plain, max_chars=800)
    assert m["hindsight/analyzer_failure/answer_error"] == 1
    assert asyncio.run(RolloutServerAnswer(tok, lambda ids, sp: tok.encode("hi")).answer(msgs)) == "hi"
