"""Action parsing and character -> token spans on generated ids.

Expected token spans are never computed with the code under test: either the ids are assembled from separately
encoded pieces (so the action's ids are known by construction), or the tokenizer's own ``offset_mapping`` of a
canonical encoding says which tokens overlap the action.
"""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from verl_hindsight import spans
from verl_hindsight.spans import ParsedAction, char_span_to_token_span, parse_tagged_action, token_char_offsets
from verl_hindsight.tiny_model import TinyModelSpec, build_tokenizer

FFFD = "\ufffd"


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TinyModelSpec())


@pytest.fixture(scope="module")
def tok_added():
    """The tiny tokenizer plus non-special added tokens written in the byte alphabet ("ä¸ĸ" spells 世) or not."""
    tk = build_tokenizer(TinyModelSpec())
    tk.add_tokens(["é!", "<x y>", "ä¸ĸ"])
    return tk


@pytest.fixture(scope="module")
def crossing_tok():
    """Byte-level BPE without the regex pre-split, so merges cross the tag boundary ("<action>go nor")."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    lines = ["<action>go north</action>", "<action>open door</action>", "<action>go west</action>", "think first"]
    t.train_from_iterator(lines * 30, trainers.BpeTrainer(vocab_size=290, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t)


@pytest.fixture(scope="module")
def unigram_tok():
    """SentencePiece-like Unigram + Metaspace tokenizer: not byte-level, so the generic path is used."""
    t = Tokenizer(models.Unigram())
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    t.decoder = decoders.Metaspace(prepend_scheme="never")
    lines = ["<action>go to the door</action>", "I think I should open it", "<think>plan</think> then act"]
    t.train_from_iterator(lines * 30, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>"],
                                                              unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


@pytest.fixture(scope="module")
def wordpiece_tok():
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece()
    t.train_from_iterator(["go to the door and open it", "take the key from the drawer"] * 20,
                          trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[UNK]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


@pytest.fixture(scope="module")
def byte_fallback_tok():
    """Llama-2 style: Unigram with <0xNN> byte pieces and a Replace/ByteFallback/Fuse/Strip decoder.

    Its prefix decodes are not stable inside a character spelled by byte pieces (they decode to U+FFFD).
    """
    vocab = [("<unk>", 0.0)] + [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    vocab += [(p, -5.0) for p in "abcdefghijklmnopqrstuvwxyz<>/▁"]
    vocab += [(p, -1.0) for p in ["<action>", "</action>", "▁go", "▁door", "go"]]
    t = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def enc(tk, text):
    return tk.encode(text, add_special_tokens=False)


def dec(tk, ids):
    return tk.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def byte_ids(tk, text):
    """One id per UTF-8 byte of ``text`` (valid but non-canonical), via the ByteLevel pre-tokenizer's byte map."""
    ((mapped, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return tk.convert_tokens_to_ids(list(mapped))


def char_ids(tk, text):
    """One canonical encoding per character: non-canonical ids for a multi-character action."""
    return [i for ch in text for i in enc(tk, ch)]


ENCODERS = {"canonical": enc, "chars": char_ids, "bytes": byte_ids}


def assemble(tk, prefix, action, suffix, how="canonical"):
    """Generated ids built piece by piece; the action's token span is known by construction."""
    p, a, s = enc(tk, prefix), ENCODERS[how](tk, action), enc(tk, suffix)
    assert dec(tk, p + a + s) == prefix + action + suffix  # the pieces decode to the intended text
    return p + a + s, (len(p), len(p) + len(a))


def covering_span(offsets, cs, ce):
    """Expected span from a tokenizer's offset_mapping: every token overlapping [cs, ce)."""
    hits = [i for i, (a, b) in enumerate(offsets) if a < ce and b > cs]
    return hits[0], hits[-1] + 1


def check_offsets_partition(text, offsets, n_ids):
    """Monotone, covering, and concatenating the non-shared parts reproduces the decoded text."""
    assert len(offsets) == n_ids
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    assert all(x[0] <= y[0] and x[1] <= y[1] for x, y in zip(offsets, offsets[1:]))
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    rebuilt, covered = [], 0
    for a, b in offsets:
        assert a <= covered  # no gap between consecutive tokens
        rebuilt.append(text[max(a, covered):b])
        covered = max(covered, b)
    assert "".join(rebuilt) == text


# ------------------------------------------------------------------------------------------ parsing rules


def test_missing_and_empty():
    assert parse_tagged_action("just words") == ParsedAction(None, None, "missing_tag", frozenset())
    assert parse_tagged_action("") == ParsedAction(None, None, "missing_tag", frozenset())
    assert parse_tagged_action("<action>   \n</action>") == ParsedAction(None, None, "empty_action", frozenset())
    assert parse_tagged_action("<action></action>").error == "empty_action"


def test_matching_is_exact_case_sensitive_and_tag_is_configurable():
    assert parse_tagged_action("<Action>x</Action>").error == "missing_tag"
    assert parse_tagged_action("<action >x</action >").error == "missing_tag"
    assert parse_tagged_action("<act>x</act> <action>y</action>", "act").text == "x"
    assert parse_tagged_action("<answer>42</answer>", tag="answer").text == "42"


def test_text_is_stripped_and_span_points_at_it():
    text = "ok <action>  go to door 2 \n</action> done"
    p = parse_tagged_action(text)
    start = text.index("go to")
    assert p == ParsedAction("go to door 2", (start, start + len("go to door 2")), None, frozenset())


def test_tags_inside_reasoning_are_ignored():
    p = parse_tagged_action("<think>maybe <action>A</action>?</think> no action here")
    assert p.error == "missing_tag" and p.char_span is None
    text = "<think>plan <action>A</action></think><action>B</action>"
    p = parse_tagged_action(text)
    assert p.text == "B" and p.flags == frozenset() and p.char_span == (text.rindex("B"), text.rindex("B") + 1)
    # reasoning never closed runs to the end and hides everything after it
    assert parse_tagged_action("<action>A</action><think>still <action>B</action>").text == "A"
    assert parse_tagged_action("<think>still thinking <action>A</action>").error == "missing_tag"
    # without the ignore list the planned action counts
    assert parse_tagged_action("<think><action>A</action></think>", ignore_inside=()).text == "A"
    # a reasoning tag inside an action is just action text
    assert parse_tagged_action("<action>say <think> x</action>").text == "say <think> x"


def test_multiple_actions_last_wins_and_is_flagged():
    text = "<action>A</action> then <action>B</action> end"
    p = parse_tagged_action(text)
    assert p.text == "B" and p.flags == {"multiple"} and text[slice(*p.char_span)] == "B"
    # the last block decides even when it is invalid
    p = parse_tagged_action("<action>A</action><action> </action>")
    assert p.error == "empty_action" and p.flags == {"multiple"}
    # non-greedy: each block ends at the first closing tag
    assert parse_tagged_action("<action>A</action>B</action>").text == "A"


def test_unclosed_action_is_accepted_when_not_truncated():
    text = "<think>ok</think><action>go north "
    p = parse_tagged_action(text)
    start = text.index("go north")
    assert p == ParsedAction("go north", (start, start + 8), None, frozenset({"unclosed"}))
    p = parse_tagged_action("<action>A</action> <action>B")
    assert p.text == "B" and p.flags == {"unclosed", "multiple"}
    assert parse_tagged_action("<action>  ") == ParsedAction(None, None, "empty_action", frozenset({"unclosed"}))
    # a cut-off prefix of the closing tag is markup, not action; a lone "<" may be part of the action
    assert parse_tagged_action("<action>go north</act").text == "go north"
    assert parse_tagged_action("<action>x <").text == "x <"
    # the decode keeps the end-of-turn token: an unclosed action stops at the first end marker
    assert parse_tagged_action("<action>go</act<|im_end|>", end_markers=("<|endoftext|>", "<|im_end|>")).text == "go"
    assert parse_tagged_action("<action>go<|im_end|>").text == "go<|im_end|>"  # no markers given
    assert parse_tagged_action("<action><|im_end|>", end_markers=("<|im_end|>",)).error == "empty_action"


def test_unclosed_action_is_invalid_when_truncated():
    text = "<think>ok</think><action>go nor"
    p = parse_tagged_action(text, truncated=True)
    start = text.index("go nor")
    assert p == ParsedAction(None, (start, len(text)), "truncated_action", frozenset({"truncated"}))
    p = parse_tagged_action("<action>go north</ac", truncated=True)
    assert p.char_span == (8, 16) and p.error == "truncated_action"
    # nothing of the action generated yet: nothing to point at
    assert parse_tagged_action("<action>", truncated=True) == ParsedAction(
        None, None, "truncated_action", frozenset({"truncated"}))
    # an earlier complete action does not rescue a truncated last one
    p = parse_tagged_action("<action>A</action><action>B", truncated=True)
    assert p.error == "truncated_action" and p.flags == {"truncated", "multiple"}
    # truncation after a complete action does not matter
    p = parse_tagged_action("<action>A</action> and then I will", truncated=True)
    assert p.text == "A" and p.error is None and p.flags == frozenset()
    # truncated inside reasoning or inside the opening tag: no action at all
    assert parse_tagged_action("<think>long reasoning <action>A", truncated=True).error == "missing_tag"
    assert parse_tagged_action("thinking... <act", truncated=True).error == "missing_tag"


# ------------------------------------------------------------------------- token spans of generated ids


PIECE_CASES = [
    # (prefix, action, suffix, how the action ids were generated, expected flags)
    ("<think>the red door needs C</think><action>", "C", "</action><|im_end|>", "canonical", set()),
    ("I think so. <action>", "go to countertop 1", "</action>", "canonical", set()),  # merged BPE tokens
    ("I think so. <action>", "go to countertop 1", "</action>", "chars", set()),  # non-canonical split
    ("<action>", "put 世界 in 🙂 drawer", "</action><|im_end|>", "canonical", set()),
    ("<action>", "取 🙂 key", "</action>", "bytes", set()),  # one byte per token
    ("<think>理由：红色 🙂 <action>no</action></think> <action>", "open", "</action>", "canonical", set()),
    ("<|im_start|>assistant\n<think>plan</think><action>", "A", "</action><|im_end|>", "canonical", set()),
    ("<action>look</action> on second thought <action>", "go west", "</action>", "canonical", {"multiple"}),
    ("<action>", "open door 3", "<|im_end|>", "canonical", {"unclosed"}),
]


@pytest.mark.parametrize("prefix, action, suffix, how, flags", PIECE_CASES)
def test_action_span_of_generated_ids(tok, prefix, action, suffix, how, flags):
    ids, expected = assemble(tok, prefix, action, suffix, how)
    p = parse_tagged_action(dec(tok, ids), end_markers=("<|im_end|>",))
    assert p.text == action and p.error is None and p.flags == flags
    assert char_span_to_token_span(tok, ids, *p.char_span) == expected


def test_action_merged_with_tag_and_whitespace(tok):
    """Canonical encodings whose tokens merge a stripped space with the first action character."""
    for text in ["<action> go</action>", "x<action> key 2</action>y", "🙂<action>世界 key</action>🙂",
                 "reasoning<action>go to door 2</action>"]:
        encoded = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = encoded["input_ids"]
        assert dec(tok, ids) == text
        p = parse_tagged_action(text)
        assert char_span_to_token_span(tok, ids, *p.char_span) == covering_span(encoded["offset_mapping"],
                                                                              *p.char_span)
    ids = enc(tok, "<action> go</action>")
    assert tok.convert_ids_to_tokens(ids[char_span_to_token_span(tok, ids, 9, 11)[0]]) == "Ġg"


@pytest.mark.parametrize("text", ["<action>go north</action>", "I think <action>open it</action>"])
def test_bpe_tokens_crossing_the_tag_boundary_are_included(crossing_tok, text):
    encoded = crossing_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    pieces = [text[a:b] for a, b in offsets]
    assert any(piece.startswith("<action>") and len(piece) > len("<action>") for piece in pieces)  # precondition
    p = parse_tagged_action(dec(crossing_tok, ids))
    a, b = char_span_to_token_span(crossing_tok, ids, *p.char_span)
    assert (a, b) == covering_span(offsets, *p.char_span)
    assert pieces[a].startswith("<action>")


def test_truncated_ids_clip_the_span(tok):
    prefix_ids = enc(tok, "<think>plan 🙂</think><action>")
    action_ids = enc(tok, "take 🙂 apple 1") + byte_ids(tok, "世") + enc(tok, " from countertop")
    cuts = [k for k in range(1, len(action_ids)) if not dec(tok, action_ids[:k]).endswith(" ")]
    assert any(dec(tok, action_ids[:k]).endswith(FFFD) for k in cuts)  # some cuts split a character
    for k in cuts:
        cut = prefix_ids + action_ids[:k]
        p = parse_tagged_action(dec(tok, cut), truncated=True)
        assert p.error == "truncated_action" and p.flags == {"truncated"} and p.text is None
        assert char_span_to_token_span(tok, cut, *p.char_span) == (len(prefix_ids), len(cut))


def test_special_tokens_own_exactly_their_content(tok):
    ids, expected = assemble(tok, "<|im_start|>assistant\n<action>", "A", "</action><|im_end|>\n")
    text = dec(tok, ids)
    offsets = token_char_offsets(tok, ids)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    start = text.index("<|im_end|>")
    assert offsets[ids.index(end_id)] == (start, start + len("<|im_end|>"))
    assert offsets[0] == (0, len("<|im_start|>"))
    assert char_span_to_token_span(tok, ids, *parse_tagged_action(text).char_span) == expected


def test_split_character_belongs_to_every_token_carrying_its_bytes(tok):
    ids = enc(tok, "a") + byte_ids(tok, "🙂") + enc(tok, "b")
    assert len(ids) == 6 and dec(tok, ids) == "a🙂b"
    assert token_char_offsets(tok, ids) == [(0, 1)] + [(1, 2)] * 4 + [(2, 3)]
    assert char_span_to_token_span(tok, ids, 1, 2) == (1, 5)
    assert char_span_to_token_span(tok, ids, 2, 3) == (5, 6)
    # a character split across a special token decodes to U+FFFD on each side, each owned by its bytes
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = byte_ids(tok, "🙂")[:2] + [im_end] + byte_ids(tok, "🙂")[2:]
    text = dec(tok, ids)
    assert text == FFFD + "<|im_end|>" + FFFD * 2
    assert token_char_offsets(tok, ids) == [(0, 1), (0, 1), (1, 11), (11, 12), (12, 13)]


def test_unknown_ids_decode_to_nothing(tok):
    unknown = len(tok) + 7
    ids = enc(tok, "<action>go</action>")
    ids = ids[:3] + [unknown] + ids[3:]
    assert dec(tok, ids) == "<action>go</action>"
    offsets = token_char_offsets(tok, ids)
    assert offsets[3][0] == offsets[3][1]
    check_offsets_partition("<action>go</action>", offsets, len(ids))


@pytest.mark.parametrize("which", ["tok", "tok_added"])
def test_random_ids_round_trip(request, which):
    """Any id sequence (specials, added tokens, invalid UTF-8, unknown ids): offsets agree with prefix decodes.

    Independent check: the characters of decode(ids[:i+1]) are exactly those of the first i+1 tokens, so the
    end of token i is its length; token i starts at the end of decode(ids[:i]) unless it shares a split
    character with the token before, which then shows as a U+FFFD where the full decode has another character.
    """
    tk = request.getfixturevalue(which)
    for seed in range(201):
        rng = random.Random(seed)
        ids = [rng.randrange(len(tk)) if rng.random() > 0.02 else len(tk) + 3 for _ in range(rng.randint(1, 40))]
        text = dec(tk, ids)
        offsets = token_char_offsets(tk, ids)
        check_offsets_partition(text, offsets, len(ids))
        for i, (start, end) in enumerate(offsets):
            assert end == len(dec(tk, ids[: i + 1])), (seed, i)
            before = dec(tk, ids[:i])
            if not text.startswith(before):
                assert start == len(before) - 1, (seed, i)
            elif before and before[-1] == FFFD:  # an invalid byte run may or may not continue into token i
                assert start in (len(before) - 1, len(before)), (seed, i)
            else:
                assert start == len(before), (seed, i)


def test_added_tokens_follow_the_byte_level_decoder(tok_added):
    """Added tokens written in the byte alphabet decode as bytes ("ä¸ĸ" -> 世, "é!" -> E9 21, invalid UTF-8);
    "<x y>" has a character outside it (the space) and is emitted as is."""
    ids = enc(tok_added, "go ") + tok_added.convert_tokens_to_ids(["é!", "<x y>", "ä¸ĸ"])
    text = dec(tok_added, ids)
    assert text == "go " + FFFD + "!<x y>世"
    assert token_char_offsets(tok_added, ids)[-3:] == [(3, 5), (5, 10), (10, 11)]


def test_byte_level_path_is_linear_and_never_decodes(tok, monkeypatch):
    rng = random.Random(0)
    ids = [rng.randrange(len(tok)) for _ in range(20_000)]
    text = dec(tok, ids)

    def no_decode(*args, **kwargs):
        raise AssertionError("the byte-level path must not decode")

    monkeypatch.setattr(tok, "decode", no_decode)
    offsets = token_char_offsets(tok, ids)
    check_offsets_partition(text, offsets, len(ids))


def test_span_arguments_are_validated(tok):
    ids = enc(tok, "abc")
    with pytest.raises(ValueError, match="empty character span"):
        char_span_to_token_span(tok, ids, 2, 2)
    with pytest.raises(ValueError, match="outside"):
        char_span_to_token_span(tok, ids, 1, 4)
    with pytest.raises(ValueError, match="outside"):
        char_span_to_token_span(tok, ids, -1, 2)
    with pytest.raises(ValueError, match="outside"):
        char_span_to_token_span(tok, [], 0, 1)
    assert token_char_offsets(tok, []) == []


# --------------------------------------------------------------------------- non-byte-level tokenizers


def test_generic_path_is_chosen_for_other_tokenizers(tok, unigram_tok, wordpiece_tok, byte_fallback_tok):
    assert spans._backend_byte_level(tok) is not None
    for tk in (unigram_tok, wordpiece_tok, byte_fallback_tok):
        assert spans._backend_byte_level(tk) is None


@pytest.mark.parametrize("prefix, action, suffix", [
    ("<think>plan</think><action>", "go to the door", "</action>"),
    ("I think I should <action>", "open it", "</action> then act"),
])
def test_unigram_metaspace_spans(unigram_tok, prefix, action, suffix):
    ids, expected = assemble(unigram_tok, prefix, action, suffix)
    text = dec(unigram_tok, ids)
    p = parse_tagged_action(text)
    assert p.text == action
    assert char_span_to_token_span(unigram_tok, ids, *p.char_span) == expected
    check_offsets_partition(text, token_char_offsets(unigram_tok, ids), len(ids))


def test_wordpiece_spans(wordpiece_tok):
    """WordPiece decodes by joining words with spaces; a word's span is its own tokens."""
    prefix, word, suffix = enc(wordpiece_tok, "take the key from"), enc(wordpiece_tok, "drawer"), enc(
        wordpiece_tok, "and open it")
    ids = prefix + word + suffix
    text = dec(wordpiece_tok, ids)
    assert text == "take the key from drawer and open it"
    start = text.index("drawer")
    assert char_span_to_token_span(wordpiece_tok, ids, start, start + 6) == (len(prefix), len(prefix) + len(word))
    check_offsets_partition(text, token_char_offsets(wordpiece_tok, ids), len(ids))


def test_byte_fallback_pieces_of_one_character_share_it(byte_fallback_tok):
    tk = byte_fallback_tok
    prefix, suffix = enc(tk, "<action>go"), enc(tk, "door</action>")
    action = tk.convert_tokens_to_ids([f"<0x{b:02X}>" for b in "🙂".encode()])
    assert dec(tk, prefix + action[:2]).endswith(FFFD)  # precondition: prefix decodes are not stable here
    ids = prefix + action + suffix
    text = dec(tk, ids)
    start = text.index("🙂")
    assert char_span_to_token_span(tk, ids, start, start + 1) == (len(prefix), len(prefix) + 4)
    assert token_char_offsets(tk, ids)[len(prefix):len(prefix) + 4] == [(start, start + 1)] * 4
    check_offsets_partition(text, token_char_offsets(tk, ids), len(ids))


@pytest.mark.parametrize("which", ["unigram_tok", "wordpiece_tok", "byte_fallback_tok"])
def test_generic_path_random_ids_cover_the_decode(request, which):
    tk = request.getfixturevalue(which)
    for seed in range(60):
        rng = random.Random(seed)
        ids = [rng.randrange(len(tk)) for _ in range(rng.randint(1, 25))]
        check_offsets_partition(dec(tk, ids), token_char_offsets(tk, ids), len(ids))
