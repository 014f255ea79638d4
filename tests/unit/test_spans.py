"""Action parsing and character->token spans on generated ids, against spans computed by re-tokenizing."""

import random

import pytest

from verl_hindsight.spans import char_span_to_token_span, parse_tagged_action, token_char_offsets
from verl_hindsight.tiny_model import TinyModelSpec, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TinyModelSpec())


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def decoded(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def span_of_pieces(tok, prefix, action, suffix):
    """Generated ids built piece by piece: the action's token span is known exactly."""
    p, a, s = enc(tok, prefix), enc(tok, action), enc(tok, suffix)
    return p + a + s, (len(p), len(p) + len(a))


@pytest.mark.parametrize("prefix, action, suffix", [
    ("<think>the red door needs C</think><action>", "C", "</action><|im_end|>"),
    ("I think so. <action>", "go to countertop 1", "</action>"),
    ("<action>", "put 世界 in 🙂 drawer", "</action><|im_end|>"),
    ("理由：红色 <action>", "open", "</action>"),
])
def test_pieces_span_is_recovered_exactly(tok, prefix, action, suffix):
    ids, expected = span_of_pieces(tok, prefix, action, suffix)
    text = decoded(tok, ids)
    parsed = parse_tagged_action(text)
    assert parsed.text == action and parsed.error is None
    assert char_span_to_token_span(tok, ids, *parsed.char_span) == expected


@pytest.mark.parametrize("text", [
    "reasoning<action>go to door 2</action>",
    "x<action>ab</action>y",  # merges may cross the tag boundary
    "🙂<action>世界 key</action>🙂",
    "<action> spaced action </action>",
])
def test_canonical_tokenization_matches_offset_mapping(tok, text):
    enc_out = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc_out["input_ids"], enc_out["offset_mapping"]
    parsed = parse_tagged_action(decoded(tok, ids))
    cs, ce = parsed.char_span
    expected_tokens = [i for i, (a, b) in enumerate(offsets) if a < ce and b > cs]
    assert char_span_to_token_span(tok, ids, cs, ce) == (expected_tokens[0], expected_tokens[-1] + 1)


def test_tags_inside_reasoning_are_ignored(tok):
    p = parse_tagged_action("<think>maybe <action>A</action>?</think> no action here")
    assert p.error == "missing_tag" and p.text is None
    p = parse_tagged_action("<think>plan <action>A</action></think><action>B</action>")
    assert p.text == "B" and "multiple" not in p.flags
    p = parse_tagged_action("<think>still thinking <action>A</action>")  # unclosed reasoning to the end
    assert p.error == "missing_tag"


def test_multiple_actions_last_wins(tok):
    text = "<action>A</action> then <action>B</action>"
    p = parse_tagged_action(text)
    assert p.text == "B" and "multiple" in p.flags and text[p.char_span[0]:p.char_span[1]] == "B"


def test_missing_empty_unclosed_truncated():
    assert parse_tagged_action("just words").error == "missing_tag"
    assert parse_tagged_action("<action>   </action>").error == "empty_action"
    unclosed = parse_tagged_action("<action>go north")
    assert unclosed.text == "go north" and "unclosed" in unclosed.flags and unclosed.error is None
    trunc = parse_tagged_action("<action>go nor", truncated=True)
    assert trunc.text is None and trunc.error == "truncated_action" and "truncated" in trunc.flags
    assert trunc.char_span == (8, 14)
    assert parse_tagged_action("<Action>x</Action>").error == "missing_tag"  # case-sensitive
    assert parse_tagged_action("<act>x</act>", "act").text == "x"  # configurable tag


def test_truncated_ids_clip_the_span(tok):
    ids, (a, b) = span_of_pieces(tok, "<action>", "take apple 1 from countertop 2", "</action>")
    cut = ids[: a + (b - a) // 2]  # generation stopped in the middle of the action
    text = decoded(tok, cut)
    p = parse_tagged_action(text, truncated=True)
    assert p.error == "truncated_action"
    assert char_span_to_token_span(tok, cut, *p.char_span) == (a, len(cut))


def test_special_tokens_in_ids(tok):
    ids, expected = span_of_pieces(tok, "<|im_start|>assistant\n<action>", "A", "</action><|im_end|>")
    text = decoded(tok, ids)
    assert "<|im_end|>" in text
    assert char_span_to_token_span(tok, ids, *parse_tagged_action(text).char_span) == expected


def test_split_multibyte_character_belongs_to_both_tokens(tok):
    from verl_hindsight.spans import _BYTE_DECODER

    byte_to_char = {v: k for k, v in _BYTE_DECODER.items()}
    byte_tokens = [tok.convert_tokens_to_ids(byte_to_char[b]) for b in "🙂".encode()]  # one token per byte
    ids = enc(tok, "a") + byte_tokens + enc(tok, "b")
    text = decoded(tok, ids)
    assert text == "a🙂b"
    offsets = token_char_offsets(tok, ids)
    assert all(offsets[i] == (1, 2) for i in range(1, 5))
    assert char_span_to_token_span(tok, ids, 1, 2) == (1, 5)


def test_random_ids_offsets_cover_the_decode(tok):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        text = decoded(tok, ids)
        offsets = token_char_offsets(tok, ids)
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
        assert all(offsets[i][0] <= offsets[i + 1][0] and offsets[i][1] <= offsets[i + 1][1]
                   for i in range(len(ids) - 1))
        assert all(a <= b for a, b in offsets)


def test_fallback_for_non_byte_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["go to the door and open it", "<action>open</action>"] * 20,
                          trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[UNK]"], show_progress=False))
    from tokenizers import decoders

    t.decoder = decoders.WordPiece()
    tk = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    ids = tk.encode("go to door", add_special_tokens=False)
    text = decoded(tk, ids)
    offsets = token_char_offsets(tk, ids)
    assert offsets[-1][1] == len(text)
    start = text.index("door")
    a, b = char_span_to_token_span(tk, ids, start, start + 4)
    assert decoded(tk, ids[a:b]).strip() == "door"


def test_empty_span_rejected(tok):
    with pytest.raises(ValueError, match="empty character span"):
        char_span_to_token_span(tok, enc(tok, "abc"), 2, 2)
