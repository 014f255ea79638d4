"""Teacher sequences built by token splicing, checked against sequences assembled independently in the test
and scored by a plain transformers forward."""

import random

import pytest
import torch

from verl_hindsight.hindsight.teacher_sequences import (
    DEFAULT_FEEDBACK_TEMPLATE,
    FeedbackRenderer,
    TargetTurn,
    forwarded_tokens,
    map_back,
    plan_teacher_sequences,
    score_with_rollout_server,
    transformers_scorer,
)

NL = "\n"


@pytest.fixture(scope="module")
def env(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    return model, tok, FeedbackRenderer(tok), transformers_scorer(model)


def response_aligned(mapped, prompt, response):
    """verl's own reading of the teacher's layout (``no_padding_2_padding``): (response_len, K) per row."""
    from tensordict import TensorDict
    from verl.workers.utils.padding import no_padding_2_padding

    nested = lambda rows: torch.nested.as_nested_tensor([torch.as_tensor(r) for r in rows], layout=torch.jagged)  # noqa: E731
    data = TensorDict({"prompts": nested([prompt]), "responses": nested([response])}, batch_size=1)
    return (no_padding_2_padding(nested([mapped.teacher_logprobs]), data)[0],
            no_padding_2_padding(nested([mapped.teacher_ids]), data)[0])


def random_trajectory(tok, rng, n_turns):
    """A multi-turn trajectory shaped like the agent loop's: random 'generated' ids for each assistant message."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    eos = tok.eos_token_id
    prompt = enc("<|im_start|>system\nOpen doors.<|im_end|>\n<|im_start|>user\nDoor 1 is red.<|im_end|>\n"
                 "<|im_start|>assistant\n")
    response, turns = [], []
    normal = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    for k in range(n_turns):
        if k:
            response += enc(NL + f"<|im_start|>user\nDoor {k + 1} is blue.<|im_end|>\n<|im_start|>assistant\n")
        start = len(response)
        message = [rng.choice(normal) for _ in range(rng.randint(3, 9))] + [eos]
        a = start + rng.randint(0, 2)
        b = rng.randint(a + 1, start + len(message) - 1)
        response += message
        turns.append((k, start, a, b))
    return prompt, response, turns


def reference_teacher(tok, model, prompt, response, targets, cumulative):
    """Independent assembly: student prefix ids + feedback message ids from the chat template + action ids."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    gen = enc("<|im_start|>assistant\n")
    full = prompt + response
    p0 = len(prompt)
    out = {}
    groups = [targets] if cumulative else [[t] for t in targets]
    for group in groups:
        seq, where, cursor = [], {}, 0
        for (k, start, a, b), fb in group:
            s = p0 + start
            seq += full[cursor:s - len(gen)]
            message = tok.apply_chat_template([{"role": "user", "content": DEFAULT_FEEDBACK_TEMPLATE.format(feedback=fb)}],
                                              tokenize=False, add_generation_prompt=True)
            seq += enc(message)
            for i in range(a, b):
                where[i] = len(seq) + (p0 + i - s)
            cursor = s
        last = group[-1][0]
        seq += full[cursor:p0 + last[3]]
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)
        for i, j in where.items():
            out[i] = float(lp[j - 1, seq[j]])
    return out


@pytest.mark.parametrize("mode", ["isolated", "cumulative"])
@pytest.mark.parametrize("seed", range(4))
def test_teacher_logprobs_equal_independent_assembly(env, mode, seed):
    model, tok, renderer, scorer = env
    rng = random.Random(seed)
    prompt, response, turns = random_trajectory(tok, rng, n_turns=rng.randint(2, 4))
    chosen = sorted(rng.sample(turns, rng.randint(1, len(turns))))
    feedback = {t[0]: f"hint {rng.randint(0, 99)}: the blue door opens with D" for t in chosen}
    targets = [TargetTurn(k, s, a, b, feedback[k]) for k, s, a, b in chosen]
    plan = plan_teacher_sequences(prompt, response, targets, renderer, mode=mode)
    assert len(plan.sequences) == (len(chosen) if mode == "isolated" else 1) and not plan.skipped
    mapped = map_back(plan, scorer([s.token_ids for s in plan.sequences]), prompt, response)
    ref = reference_teacher(tok, model, prompt, response, [(t, feedback[t[0]]) for t in chosen], mode == "cumulative")
    assert set(mapped.hindsight_mask.nonzero().flatten().tolist()) == set(ref)
    lps, ids = response_aligned(mapped, prompt, response)
    assert lps.shape == ids.shape == (len(response), 1)
    for i in range(len(response)):
        if i in ref:  # verl's layout, read back by verl: the sampled token and the teacher's log-prob of it
            assert float(mapped.sampled_log_probs[i]) == pytest.approx(ref[i], abs=1e-5)
            assert float(lps[i, 0]) == pytest.approx(ref[i], abs=1e-5) and int(ids[i, 0]) == response[i]
        else:
            assert float(lps[i, 0]) == 0.0 and float(mapped.sampled_log_probs[i]) == 0.0
    if mode == "isolated":  # never forwards tokens past a target's action
        for seq, (k, s, a, b) in zip(plan.sequences, chosen):
            assert int(seq.token_ids[-1]) == response[b - 1]


def test_cumulative_forwards_fewer_tokens_than_isolated(env):
    _, tok, renderer, _ = env
    prompt, response, turns = random_trajectory(tok, random.Random(7), n_turns=4)
    targets = [TargetTurn(k, s, a, b, "fb") for k, s, a, b in turns]
    iso = plan_teacher_sequences(prompt, response, targets, renderer, mode="isolated")
    cum = plan_teacher_sequences(prompt, response, targets, renderer, mode="cumulative")
    assert forwarded_tokens(cum) < forwarded_tokens(iso)


def test_over_length_sequences_are_truncated_left_or_skipped(env):
    model, tok, renderer, scorer = env
    prompt, response, turns = random_trajectory(tok, random.Random(3), n_turns=3)
    k, s, a, b = turns[-1]
    targets = [TargetTurn(k, s, a, b, "some feedback")]
    full_plan = plan_teacher_sequences(prompt, response, targets, renderer)
    n = len(full_plan.sequences[0].token_ids)
    cut = plan_teacher_sequences(prompt, response, targets, renderer, max_length=n - 5)
    seq = cut.sequences[0]
    assert len(seq.token_ids) == n - 5 and seq.truncated_left == 5
    assert seq.token_ids.tolist() == full_plan.sequences[0].token_ids[5:].tolist()
    teacher = map_back(cut, scorer([seq.token_ids]), prompt, response).sampled_log_probs
    with torch.no_grad():  # reference: forward of the left-truncated sequence
        lp = model(input_ids=seq.token_ids.unsqueeze(0)).logits[0].float().log_softmax(-1)
    for i, j in seq.positions.tolist():
        assert float(teacher[i]) == pytest.approx(float(lp[j - 1, seq.token_ids[j]]), abs=1e-5)
    skipped = plan_teacher_sequences(prompt, response, targets, renderer, max_length=n - 5, overflow="skip")
    assert not skipped.sequences and skipped.skipped == [(k, "too_long")]
    # a limit below the action's own length + 1 cannot keep the target with any context at all
    tiny = plan_teacher_sequences(prompt, response, targets, renderer, max_length=b - a)
    assert tiny.skipped == [(k, "too_long")]


def test_bad_targets_are_skipped_with_reason_and_mask_respects_action_mask(env):
    _, tok, renderer, scorer = env
    prompt, response, turns = random_trajectory(tok, random.Random(5), n_turns=2)
    (k0, s0, a0, b0), (k1, s1, a1, b1) = turns
    plan = plan_teacher_sequences(prompt, response, [TargetTurn(k0, s0 + 1, a0 + 1, b0, "x"),  # not at a turn start
                                                     TargetTurn(k1, s1, a1, b1, "y")], renderer)
    assert plan.skipped == [(k0, "no_generation_prompt")] and len(plan.sequences) == 1
    action_mask = [1] * len(response)
    action_mask[a1] = 0  # e.g. a token the agent loop did not count as action
    mask = map_back(plan, scorer([s.token_ids for s in plan.sequences]), prompt, response, action_mask).hindsight_mask
    assert mask[a1] == 0 and int(mask.sum()) == b1 - a1 - 1
    with pytest.raises(ValueError, match="mode"):
        plan_teacher_sequences(prompt, response, [], renderer, mode="sometimes")


async def test_rollout_server_scoring_matches_transformers(env, tiny_model_dir):
    from verl.workers.config import RolloutConfig

    from verl_hindsight.rollout.hf_server import HFRolloutServer

    model, tok, renderer, scorer = env
    server = HFRolloutServer(config=RolloutConfig(name="hf", prompt_length=256, response_length=16, dtype="float32",
                                                  tensor_model_parallel_size=1),
                             model_config={"path": str(tiny_model_dir)})

    async def generate(request_id, prompt_ids, sampling_params):
        return await server.generate(prompt_ids, dict(sampling_params), request_id)

    prompt, response, turns = random_trajectory(tok, random.Random(11), n_turns=3)
    plan = plan_teacher_sequences(prompt, response, [TargetTurn(k, s, a, b, "fb") for k, s, a, b in turns],
                                  renderer, mode="isolated")
    seqs = [s.token_ids for s in plan.sequences]
    via_server = await score_with_rollout_server(generate, seqs)
    direct = scorer(seqs)
    for a, b in zip(via_server, direct):
        assert torch.allclose(a, b, atol=1e-5)


def _record(k, start, end, error):
    return {"turn": k, "response_span": [start, end], "has_action": True, "action": "A", "observation": f"o{k}",
            "anchor": f"o{k}", "feedback": error or f"next {k}", "error": error, "next_observation": f"next {k}",
            "reward": 0.0, "done": False, "invalid_action": False}


@pytest.mark.parametrize("mode", ["isolated", "cumulative"])
def test_run_stage_maps_teacher_logprobs_onto_each_rows_targeted_action_tokens(env, mode):
    """The whole stage on a batch (feedback source -> targets -> splice -> scorer -> per-row tensors) equals the
    independent assembly, row by row; untargeted rows, turns without feedback and padding rows stay 0."""
    from verl_hindsight.config import FeedbackConfig, TargetConfig, TeacherConfig
    from verl_hindsight.hindsight.stage import Row, run_stage

    model, tok, renderer, scorer = env
    rng = random.Random(11)
    rows, expected = [], []
    for r in range(4):
        prompt, response, turns = random_trajectory(tok, rng, n_turns=3)
        ends = [t[1] for t in turns[1:]] + [len(response)]
        errors = {k: (f"wrong key {r}{k}" if rng.random() < 0.6 else None) for k, *_ in turns}
        records = [_record(k, s, e, errors[k]) for (k, s, a, b), e in zip(turns, ends)]
        success = r == 3  # a successful rollout: never targeted with trajectories=failed
        extra = {"hs_turns": records, "hs_env": {"success": success, "return": float(success)}}
        action_mask = [0] * len(response)
        for _, _, a, b in turns:
            action_mask[a:b] = [1] * (b - a)
            if b - a >= 2:  # a non-action token inside the span (a closing tag): never targeted
                action_mask[b - 1] = 0
        old = [rng.uniform(-5, 0) for _ in response]
        rows.append(Row(uid="g", prompt_ids=prompt, response_ids=response, action_mask=action_mask,
                        extra_fields=extra, old_log_probs=old))
        chosen = [t for t in turns if errors[t[0]]] if not success else []
        ref = reference_teacher(tok, model, prompt, response, [(t, errors[t[0]]) for t in chosen],
                                mode == "cumulative") if chosen else {}
        expected.append({i: v for i, v in ref.items() if action_mask[i]})
    rows.append(Row(uid="g", prompt_ids=rows[0].prompt_ids, response_ids=[5], action_mask=[0], extra_fields=rows[0]
                    .extra_fields, old_log_probs=[0.0], is_padding=True))
    result = run_stage(rows, feedback_config=FeedbackConfig(source="error"),
                       target_config=TargetConfig(turns="with_feedback", trajectories="failed"),
                       teacher_config=TeacherConfig(mode=mode), renderer=renderer, scorer=scorer)
    for row, mapped, ref in zip(rows, result.rows, expected):
        assert set(mapped.hindsight_mask.nonzero().flatten().tolist()) == set(ref)
        lps, ids = response_aligned(mapped, row.prompt_ids, row.response_ids)
        for i in range(len(row.response_ids)):
            assert float(lps[i, 0]) == (pytest.approx(ref[i], abs=1e-5) if i in ref else 0.0)
            assert int(ids[i, 0]) == (int(row.response_ids[i]) if i in ref else 0)
    padding = result.rows[-1]
    assert not padding.teacher_logprobs.any() and not padding.hindsight_mask.any()
    assert padding.teacher_logprobs.shape == (len(rows[-1].prompt_ids) + 1, 1)
    m = result.metrics
    assert m["hindsight/targeted_tokens"] == sum(len(r) for r in expected)
    # no response_mask on these rows: every response token counts; the padding row is left out
    assert m["hindsight/targeted_token_frac_of_response"] == pytest.approx(
        sum(len(r) for r in expected) / sum(len(r.response_ids) for r in rows[:-1]))
    gaps = [ref[i] - float(rows[k].old_log_probs[i]) for k, ref in enumerate(expected) for i in ref]
    assert m["hindsight/gap_mean"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
    assert m["hindsight/teacher_to_student_tokens"] > 0 and "hindsight/teacher_collapse" in m

    # the top-k scorer (topk_tail loss): the teacher's top-k on targeted tokens only, same sampled log-probs
    from verl_hindsight.hindsight.teacher_sequences import sampled_log_probs, transformers_topk_scorer

    k = 4
    with_topk = run_stage(rows, feedback_config=FeedbackConfig(source="error"),
                          target_config=TargetConfig(turns="with_feedback", trajectories="failed"),
                          teacher_config=TeacherConfig(mode=mode), renderer=renderer,
                          topk_scorer=transformers_topk_scorer(model, k), topk=k)
    assert m["hindsight/gap_mean"] == pytest.approx(with_topk.metrics["hindsight/gap_mean"], abs=1e-6)
    for row, mapped, sampled in zip(rows, with_topk.rows, result.rows):
        assert torch.equal(mapped.hindsight_mask, sampled.hindsight_mask)
        assert torch.allclose(mapped.sampled_log_probs, sampled.sampled_log_probs, atol=1e-6)
        lps, ids = response_aligned(mapped, row.prompt_ids, row.response_ids)
        assert ids.shape == lps.shape == (len(row.response_ids), k)
        read_back = sampled_log_probs(mapped.teacher_ids, mapped.teacher_logprobs, len(row.prompt_ids),
                                      row.response_ids)
        for i, keep in enumerate(mapped.hindsight_mask.tolist()):
            if not keep:
                assert not ids[i].any() and not lps[i].any()
                continue
            teacher = float(sampled.sampled_log_probs[i])
            assert torch.all(lps[i][:-1] >= lps[i][1:]) and lps[i][0] >= teacher - 1e-5  # sorted, top-1 first
            hit = (ids[i] == row.response_ids[i]).nonzero()
            if len(hit):  # the student's token among the teacher's top-k: the same forward, the same value
                assert float(lps[i][hit[0, 0]]) == pytest.approx(teacher, abs=1e-5)
                assert float(read_back[i]) == pytest.approx(teacher, abs=1e-5)
            else:
                assert torch.isnan(read_back[i])


def test_message_span_scores_every_generated_token_of_the_targeted_turn(env):
    """targets.span=message: the hindsight mask covers the targeted turn's whole generated message (format tokens
    included), never the observation tokens after it; values equal the independent assembly."""
    from verl_hindsight.config import FeedbackConfig, TargetConfig, TeacherConfig
    from verl_hindsight.hindsight.stage import Row, run_stage

    model, tok, renderer, scorer = env
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompt, response, turns = random_trajectory(tok, random.Random(5), n_turns=3)
    obs_len = {k: len(enc(NL + f"<|im_start|>user\nDoor {k + 1} is blue.<|im_end|>\n<|im_start|>assistant\n"))
               for k in range(1, 3)}
    message_end = [turns[k + 1][1] - obs_len[k + 1] for k in range(2)] + [len(response)]
    response_mask = [0] * len(response)
    for (k, start, _, _), end in zip(turns, message_end):
        response_mask[start:end] = [1] * (end - start)
    action_mask = [0] * len(response)
    for _, _, a, b in turns:
        action_mask[a:b] = [1] * (b - a)
    ends = [t[1] for t in turns[1:]] + [len(response)]
    records = [_record(k, s, e, "wrong key" if k == 1 else None) for (k, s, a, b), e in zip(turns, ends)]
    row = Row(uid="g", prompt_ids=prompt, response_ids=response, action_mask=action_mask, response_mask=response_mask,
              extra_fields={"hs_turns": records, "hs_env": {"success": False, "return": 0.0}},
              old_log_probs=[0.0] * len(response))
    result = run_stage([row], feedback_config=FeedbackConfig(source="error"),
                       target_config=TargetConfig(turns="with_feedback", trajectories="failed", span="message"),
                       teacher_config=TeacherConfig(), renderer=renderer, scorer=scorer)
    k, start, _, _ = turns[1]
    ref = reference_teacher(tok, model, prompt, response, [((k, start, start, message_end[1]), "wrong key")], False)
    mapped = result.rows[0]
    assert set(mapped.hindsight_mask.nonzero().flatten().tolist()) == set(range(start, message_end[1])) == set(ref)
    for i in ref:
        assert float(mapped.sampled_log_probs[i]) == pytest.approx(ref[i], abs=1e-5)
    with pytest.raises(ValueError, match="response_mask"):
        run_stage([Row(**{**row.__dict__, "response_mask": None})], feedback_config=FeedbackConfig(source="error"),
                  target_config=TargetConfig(turns="with_feedback", trajectories="failed", span="message"),
                  teacher_config=TeacherConfig(), renderer=renderer, scorer=scorer)


@pytest.mark.parametrize("mode", ["isolated", "cumulative"])
def test_without_feedback_each_teacher_sequence_is_the_student_s_own_context(env, mode):
    """hindsight.teacher.insert_feedback=false: the teacher sequence of a target is the student's prompt + response
    up to the target's action, each token scored at its own position."""
    _, tok, renderer, _ = env
    prompt, response, turns = random_trajectory(tok, random.Random(9), n_turns=3)
    full = prompt + response
    targets = [TargetTurn(k, s, a, b, f"wrong key {k}") for k, s, a, b in turns[1:]]
    plan = plan_teacher_sequences(prompt, response, targets, renderer, mode=mode, insert_feedback=False)
    ends = [b for *_, b in turns[1:]] if mode == "isolated" else [turns[-1][3]]
    assert [s.token_ids.tolist() for s in plan.sequences] == [full[:len(prompt) + end] for end in ends]
    for seq in plan.sequences:
        assert torch.equal(seq.positions[:, 1], seq.positions[:, 0] + len(prompt))
    with_feedback = plan_teacher_sequences(prompt, response, targets, renderer, mode=mode)
    assert [s.turns for s in plan.sequences] == [s.turns for s in with_feedback.sequences]
    assert [s.positions[:, 0].tolist() for s in plan.sequences] == [
        s.positions[:, 0].tolist() for s in with_feedback.sequences]


def test_no_feedback_control_targets_the_same_tokens_and_scores_the_student_context(env):
    """The stage with insert_feedback=false selects exactly the turns and tokens it selects with feedback (the
    feedback still decides the targets), and the teacher's log-probs are those of a plain forward of the student's
    own sequence."""
    from verl_hindsight.config import FeedbackConfig, TargetConfig, TeacherConfig
    from verl_hindsight.hindsight.stage import Row, run_stage

    model, tok, renderer, scorer = env
    rng = random.Random(13)
    rows = []
    for r in range(3):
        prompt, response, turns = random_trajectory(tok, rng, n_turns=3)
        ends = [t[1] for t in turns[1:]] + [len(response)]
        errors = {k: ("wrong key" if (k + r) % 2 else None) for k, *_ in turns}
        records = [_record(k, s, e, errors[k]) for (k, s, a, b), e in zip(turns, ends)]
        action_mask = [0] * len(response)
        for _, _, a, b in turns:
            action_mask[a:b] = [1] * (b - a)
        rows.append(Row(uid="g", prompt_ids=prompt, response_ids=response, action_mask=action_mask,
                        extra_fields={"hs_turns": records, "hs_env": {"success": False, "return": 0.0}},
                        old_log_probs=[0.0] * len(response)))
    kwargs = dict(feedback_config=FeedbackConfig(source="error"),
                  target_config=TargetConfig(turns="with_feedback", trajectories="failed"), renderer=renderer,
                  scorer=scorer)
    fed = run_stage(rows, teacher_config=TeacherConfig(), **kwargs)
    control = run_stage(rows, teacher_config=TeacherConfig(insert_feedback=False), **kwargs)
    assert sorted(control.inserted_feedback) == sorted(fed.inserted_feedback)  # the same (row, turn) targets
    assert set(fed.inserted_feedback.values()) == {"wrong key"} and set(control.inserted_feedback.values()) == {""}
    assert control.metrics["hindsight/targeted_tokens"] == fed.metrics["hindsight/targeted_tokens"] > 0
    for row, a, b in zip(rows, fed.rows, control.rows):
        assert torch.equal(a.hindsight_mask, b.hindsight_mask)
        full = torch.cat([row.prompt_ids, row.response_ids])
        with torch.no_grad():
            lp = model(input_ids=full.unsqueeze(0)).logits[0].float().log_softmax(-1)
        for i in b.hindsight_mask.nonzero().flatten().tolist():
            j = len(row.prompt_ids) + i
            assert float(b.sampled_log_probs[i]) == pytest.approx(float(lp[j - 1, full[j]]), abs=1e-5)
        # with feedback the same tokens are scored in another context
        assert not torch.allclose(a.sampled_log_probs[a.hindsight_mask.bool()],
                                  b.sampled_log_probs[b.hindsight_mask.bool()])
