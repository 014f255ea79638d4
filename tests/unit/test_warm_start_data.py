"""The demo's warm-start data: what is labelled, and that the hidden rule is never taught."""

import random
import re

import pytest

from verl_hindsight.demo.warm_start import _episode, _tokenize
from verl_hindsight.envs.toy import KeyDoorCorridor


def _answers(tok, messages):
    """(key, labelled?) per assistant answer, read back from the token labels."""
    ids, labels = _tokenize(tok, messages)
    assert len(ids) == len(labels)
    key_ids = {tok.encode(k, add_special_tokens=False)[0]: k for k in "ABCDEF"}
    out = []
    for i, (tid, lab) in enumerate(zip(ids, labels)):
        # a key token right after "<action>": ids[i-1] is ">" of the opening tag
        if tid in key_ids and tok.decode(ids[max(0, i - 3):i]).endswith("<action>"):
            out.append((key_ids[tid], lab == tid))
    return out


@pytest.mark.parametrize("mode", ["random", "none", "recall"])
def test_labels_and_targets(tiny_model_and_tokenizer, mode):
    _, tok = tiny_model_and_tokenizer
    env = KeyDoorCorridor()
    rng = random.Random(0)
    rule_hits = answers = 0
    for _ in range(200):
        messages = _episode(env, rng, hint_prob=0.5, unhinted_target=mode)
        seen, hinted_key = [], {}
        for m in messages:
            hint = re.search(r"the (\w+) door opens with ([A-F])", m["content"]) if m["role"] == "user" else None
            if hint:
                hinted_key[hint.group(1)] = hint.group(2)
                last_hint = hint.group(1)
            door = re.search(r"is (\w+)\.", m["content"]) if m["role"] == "user" else None
            if door:
                colour, last_hint = door.group(1), None
            if m["role"] == "assistant":
                seen.append((colour, last_hint, hinted_key.get(colour)))  # what was hinted up to this turn
        got = _answers(tok, messages)
        assert len(got) == len(seen)
        for (colour, hint_here, known), (key, labelled) in zip(seen, got):
            answers += 1
            rule_hits += key == env.rule[colour]
            if hint_here:
                assert labelled and key == known
            elif mode == "recall" and known:
                assert labelled and key == known  # the episode's own permutation, recalled from an earlier hint
            else:
                assert labelled == (mode != "none")
    # targets follow random per-episode permutations, never the hidden rule: chance agreement (1/6)
    assert abs(rule_hits / answers - 1 / 6) < 0.05


def test_unknown_mode_is_rejected(tmp_path):
    from verl_hindsight.demo.warm_start import warm_start

    with pytest.raises(ValueError, match="unhinted_target"):
        warm_start(tmp_path, tmp_path, steps=1, unhinted_target="rule")
