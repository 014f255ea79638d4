"""Read a GGUF file (llama.cpp's format) into what transformers loads: dequantized tensors and a tokenizer.

Only the ``gguf`` package (llama.cpp's reader, pure Python + numpy) is used: transformers' own GGUF path parses the
262k-entry vocabulary in Python for minutes and builds a wrong tokenizer for SentencePiece-BPE vocabularies such as
Gemma's (a Unigram model, no BOS). The tokenizer built here follows SentencePiece's BPE rules instead:

- pieces of type USER_DEFINED (whitespace runs, a few HTML tags) match the raw text before anything else and never
  merge with their neighbours, as in llama.cpp and SentencePiece (llama.cpp's converter stores their spaces as plain
  spaces, SentencePiece as ``▁``: the same match);
- CONTROL pieces (``<bos>``, ``<start_of_turn>``, ...) are special tokens, never produced from plain text;
- the remaining text has spaces replaced by ``▁`` and is merged pair by pair, always merging the pair whose merged
  piece has the highest score (SentencePiece's BPE), with characters outside the vocabulary split into byte pieces
  ``<0xAB>`` (``byte_fallback``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True)
class GGUFVocab:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool
    add_space_prefix: bool


class GGUFFile:
    """Metadata, vocabulary and tensors of one GGUF file (memory-mapped; tensors dequantized one at a time)."""

    def __init__(self, path: str | Path):
        try:
            from gguf import GGUFReader
        except ImportError as exc:
            raise ImportError("reading a GGUF file needs the `gguf` package: pip install gguf") from exc
        self.path = Path(path)
        self.reader = GGUFReader(str(self.path))

    def value(self, key: str, default: Any = ...) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise KeyError(f"{self.path.name}: GGUF metadata has no {key!r}")
            return default
        return field.contents()

    @property
    def architecture(self) -> str:
        return self.value("general.architecture")

    def vocab(self) -> GGUFVocab:
        model = self.value("tokenizer.ggml.model")
        if model != "llama":  # llama.cpp's name for SentencePiece vocabularies
            raise ValueError(f"{self.path.name}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') "
                             "vocabularies are supported")
        fields = self.reader.fields
        # contents() builds one Python object per entry through generic code; reading the parts directly is ~100x
        # faster for a 262k vocabulary
        tok = fields["tokenizer.ggml.tokens"]
        pieces = [bytes(tok.parts[i]).decode("utf-8") for i in tok.data]
        scores_f, types_f = fields["tokenizer.ggml.scores"], fields["tokenizer.ggml.token_type"]
        scores = [float(scores_f.parts[i][0]) for i in scores_f.data]
        types = [int(types_f.parts[i][0]) for i in types_f.data]
        return GGUFVocab(pieces=pieces, scores=scores, types=types,
                         bos_id=int(self.value("tokenizer.ggml.bos_token_id")),
                         eos_id=int(self.value("tokenizer.ggml.eos_token_id")),
                         unk_id=int(self.value("tokenizer.ggml.unknown_token_id")),
                         pad_id=int(self.value("tokenizer.ggml.padding_token_id", 0)),
                         add_bos=bool(self.value("tokenizer.ggml.add_bos_token", True)),
                         add_space_prefix=bool(self.value("tokenizer.ggml.add_space_prefix", False)))

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """``(name, float32 numpy array)`` in the file's order; shapes are (out, in) as torch's Linear stores them."""
        from gguf.quants import dequantize

        for t in self.reader.tensors:
            yield t.name, dequantize(t.data, t.tensor_type)


def bpe_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Merge rules equivalent to SentencePiece BPE: every split of a NORMAL piece into two pieces of the vocabulary
    is a rule, ranked by the merged piece's score (highest first; ties by the merged piece's id)."""
    index = {p: i for i, p in enumerate(vocab.pieces)}
    ranked = []
    for i, (piece, kind) in enumerate(zip(vocab.pieces, vocab.types)):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                ranked.append((-vocab.scores[i], i, index[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(vocab: GGUFVocab):
    """A ``tokenizers.Tokenizer`` equal to SentencePiece on this vocabulary (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if vocab.add_space_prefix:
        raise ValueError("SentencePiece vocabularies with add_space_prefix (a dummy leading space) are not supported")
    merges = bpe_merges(vocab)
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(vocab.pieces)}, merges=merges,
                               unk_token=vocab.pieces[vocab.unk_id], fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
                    for p, kind in zip(vocab.pieces, vocab.types) if kind == USER_DEFINED])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, kind in zip(vocab.pieces, vocab.types) if kind in (CONTROL, UNKNOWN)])
    if vocab.add_bos:
        bos = vocab.pieces[vocab.bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab.bos_id)])
    return tok


def sentencepiece_model_proto(vocab: GGUFVocab) -> bytes:
    """The same vocabulary as a SentencePiece ``ModelProto`` (BPE, byte fallback, whitespace escaped, no dummy
    prefix): an independent implementation to check :func:`build_tokenizer` against (needs ``sentencepiece``)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    kinds = {NORMAL: pb.ModelProto.SentencePiece.NORMAL, UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
             CONTROL: pb.ModelProto.SentencePiece.CONTROL, USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
             UNUSED: pb.ModelProto.SentencePiece.UNUSED, BYTE: pb.ModelProto.SentencePiece.BYTE}
    m = pb.ModelProto()
    for piece, score, kind in zip(vocab.pieces, vocab.scores, vocab.types):
        if kind == USER_DEFINED:
            # llama.cpp's converter writes user-defined pieces with plain spaces (it matches them on the raw text);
            # SentencePiece matches them after escaping whitespace, so its pieces carry the visible space
            piece = piece.replace(" ", SPACE)
        m.pieces.add(piece=piece, score=score, type=kinds[kind])
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = len(vocab.pieces)
    m.trainer_spec.unk_id, m.trainer_spec.bos_id = vocab.unk_id, vocab.bos_id
    m.trainer_spec.eos_id, m.trainer_spec.pad_id = vocab.eos_id, vocab.pad_id
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = vocab.add_space_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return m.SerializeToString()
