"""Find the action in an assistant turn and map its characters to the exact generated tokens.

Hindsight credit goes to the action tokens of a turn only. The ids a model generated need not be the canonical
tokenization of their text (sampling can produce any id sequence), so spans are computed on the generated ids
themselves, never by re-tokenizing:

1. ``text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)``
2. ``parsed = parse_tagged_action(text, tag, truncated=...)``
3. ``tok_start, tok_end = char_span_to_token_span(tokenizer, ids, *parsed.char_span)``

Every character offset in this module refers to exactly the string of step 1, so the caller must parse the action
on that same string (decoding with other arguments, or re-joining messages, shifts the offsets).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["ParsedAction", "parse_tagged_action", "token_char_offsets", "char_span_to_token_span"]


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedAction:
    """What :func:`parse_tagged_action` found in one assistant turn."""

    text: Optional[str]  # the action to execute (stripped); None when invalid
    # [start, end) of the action text in the turn text, surrounding whitespace excluded; also set for a truncated
    # action (its clipped remainder) so its tokens can still be located; None when there is nothing to point at
    char_span: Optional[tuple[int, int]]
    error: Optional[str]  # None, "missing_tag", "empty_action" or "truncated_action"
    flags: frozenset[str] = field(default_factory=frozenset)  # subset of {"unclosed", "multiple", "truncated"}


def _tagged_blocks(text: str, tag: str, ignore_inside: tuple[str, ...]) -> list[tuple[int, int, bool]]:
    """``(content_start, content_end, closed)`` of every ``<tag>`` block outside ignored blocks, in order.

    One left-to-right scan, so whichever opening tag comes first wins: a ``<think>`` block hides the action tags
    inside it, and inside an action block everything up to the first closing tag is action text.
    """
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    names = [tag] + [n for n in ignore_inside if n and n != tag]
    opener = re.compile("|".join(re.escape(f"<{n}>") for n in names))
    blocks: list[tuple[int, int, bool]] = []
    pos = 0
    while (m := opener.search(text, pos)) is not None:
        if m.group() == open_tag:
            close = text.find(close_tag, m.end())
            if close < 0:  # never closed: the rest of the text is the (unclosed) action
                blocks.append((m.end(), len(text), False))
                break
            blocks.append((m.end(), close, True))
            pos = close + len(close_tag)
        else:
            name = m.group()[1:-1]
            close = text.find(f"</{name}>", m.end())
            if close < 0:  # reasoning that is never closed hides everything after it
                break
            pos = close + len(name) + 3
    return blocks


def _drop_partial_close(text: str, start: int, end: int, close_tag: str) -> int:
    """End of an unclosed block without a cut-off prefix of the closing tag (``go north</act``).

    Only prefixes of two or more characters count: a lone trailing ``<`` may be part of the action.
    """
    for k in range(len(close_tag) - 1, 1, -1):
        if text.endswith(close_tag[:k], start, end):
            return end - k
    return end


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace (same characters as ``str.strip``)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def parse_tagged_action(text: str, tag: str = "action", *, truncated: bool = False,
                        ignore_inside: tuple[str, ...] = ("think",),
                        end_markers: tuple[str, ...] = ()) -> ParsedAction:
    """The action inside ``<tag>...</tag>`` in one assistant turn.

    ``truncated`` says the generation stopped at the length limit (not at end-of-sequence). ``end_markers`` are
    texts that end the turn, typically ``(tokenizer.eos_token,)``: the decode keeps special tokens, so a turn that
    stopped right after an unclosed action ends with e.g. ``<|im_end|>``, which is not part of the action. Rules:

    - Tags are matched exactly and case-sensitively (``<action>``, not ``<Action>`` or ``<action >``).
    - Tags inside an ``ignore_inside`` block (``<think>...</think>``, or an unclosed ``<think>`` running to the end
      of the text) are ignored: a model planning ``<action>x</action>`` in its reasoning is not acting.
    - Blocks are found left to right; inside an action block everything up to the first ``</tag>`` is action text
      (non-greedy, like the usual ``<tag>(.*?)</tag>`` parsers).
    - Several action blocks outside reasoning: the LAST one decides, flag "multiple" (even if it is invalid).
    - The last block is an opening tag never closed. It runs to the first end marker after it, or to the end of
      the text; a cut-off prefix of the closing tag (``go north</act``) just before that is dropped. Then:
        * ``truncated``: error "truncated_action", flag "truncated", ``char_span`` = the clipped remainder (None if
          nothing of the action was generated), ``text`` None;
        * otherwise the model stopped after its action without closing the tag: the remainder is accepted as the
          action, flag "unclosed" (the released SERL code accepts this too).
    - No action block at all: error "missing_tag" (``text`` and ``char_span`` None).
    - An action block with only whitespace: error "empty_action" (``text`` and ``char_span`` None).
    - ``text`` is the action stripped of surrounding whitespace and ``char_span`` points at exactly those
      characters: ``text == turn_text[char_span[0]:char_span[1]]``.
    - A complete action is valid even when ``truncated`` is set (the cut came after it).

    Offsets refer to ``text`` as given; to map them to tokens, ``text`` must be the decode described in the
    module docstring.
    """
    blocks = _tagged_blocks(text, tag, ignore_inside)
    if not blocks:
        return ParsedAction(None, None, "missing_tag", frozenset())
    start, end, closed = blocks[-1]
    flags = {"multiple"} if len(blocks) > 1 else set()
    if not closed:
        for marker in end_markers:  # the end-of-turn text (e.g. "<|im_end|>") is not action text
            at = text.find(marker, start, end) if marker else -1
            end = at if at >= 0 else end
        end = _drop_partial_close(text, start, end, f"</{tag}>")
    start, end = _strip_span(text, start, end)
    span = (start, end) if end > start else None
    if not closed and truncated:
        return ParsedAction(None, span, "truncated_action", frozenset(flags | {"truncated"}))
    if not closed:
        flags.add("unclosed")
    if span is None:
        return ParsedAction(None, None, "empty_action", frozenset(flags))
    return ParsedAction(text[start:end], span, None, frozenset(flags))


# ------------------------------------------------------------------------------- character -> token spans


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in.

    Printable Latin-1 bytes map to themselves; the others are shifted to U+0100 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_OF_CHAR = {ch: b for b, ch in _bytes_to_unicode().items()}

# Decoding error handler that replaces each maximal invalid byte run (what ``errors="replace"`` and Rust's
# ``from_utf8_lossy`` turn into ONE U+FFFD) with a lone surrogate encoding the run's length in bytes. Valid UTF-8
# never decodes to a surrogate, so the marker is unambiguous, and the handler is stateless (thread-safe).
_RUN_MARK = 0xDC00
_ERRORS = "verl_hindsight.spans.mark_invalid_runs"
codecs.register_error(_ERRORS, lambda exc: (chr(_RUN_MARK + exc.end - exc.start), exc.end))


def _backend_byte_level(tokenizer):
    """The ``tokenizers`` backend if its decoder is exactly ByteLevel, else None.

    The decoder is what defines ``decode``: a ByteLevel pre-tokenizer with another decoder (or a ByteLevel step
    inside a decoder Sequence) would not decode as plain bytes, so those take the generic path.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import decoders

    return backend if isinstance(backend.decoder, decoders.ByteLevel) else None


def _piece_bytes(piece: Optional[str]) -> bytes:
    """The bytes ``tokenizers``' ByteLevel decoder emits for one token string.

    Like the decoder: map every character through the byte table, or, if any character is outside the table
    (e.g. an added token containing a space), emit the token's own UTF-8. Added tokens whose characters all lie
    in the table (``<|im_end|>``: printable ASCII maps to itself) therefore go through the table too. Ids unknown
    to the tokenizer (``None``) are skipped by ``decode`` and contribute nothing.
    """
    if piece is None:
        return b""
    try:
        return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
    except KeyError:
        return piece.encode("utf-8")


def _utf8_width(ch: str) -> int:
    """Bytes behind one character of the marked decode (see ``_ERRORS``)."""
    o = ord(ch)
    if _RUN_MARK < o <= _RUN_MARK + 4:
        return o - _RUN_MARK  # one U+FFFD standing for this many invalid bytes
    return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4


def _byte_level_offsets(backend, token_ids: list[int]) -> list[tuple[int, int]]:
    """Exact offsets for ByteLevel decoders, in O(bytes), without calling ``decode`` per token.

    ``decode`` concatenates all token bytes and decodes them once, lossily; so do we, and then map each token's
    byte range [b0, b1) to the characters owning any of those bytes.
    """
    pieces = [_piece_bytes(backend.id_to_token(int(i))) for i in token_ids]
    data = b"".join(pieces)
    marked = data.decode("utf-8", errors=_ERRORS)
    # started[b] = number of characters whose first byte is < b, for b = 0..len(data)
    if marked.isascii():  # the common case: one byte per character
        started = range(len(data) + 1)
    else:
        started = [0]
        for k, ch in enumerate(marked):
            started.extend([k + 1] * _utf8_width(ch))
    n_chars, offsets, b0 = len(marked), [], 0
    for piece in pieces:
        b1 = b0 + len(piece)
        # first character: the one containing byte b0 (for an empty piece inside a split character, that one)
        start = started[b0 + 1] - 1 if b0 < len(data) else n_chars
        # end: every character that starts before b1 (for an empty piece: before b0)
        offsets.append((start, started[b1]))
        b0 = b1
    return offsets


# the decoder of SentencePiece-BPE vocabularies converted to `tokenizers` (no dummy-prefix stripping)
_SENTENCEPIECE_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
_FALLBACK_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _backend_sentencepiece(tokenizer):
    """The ``tokenizers`` backend if its decoder is exactly :data:`_SENTENCEPIECE_DECODER`, else None."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return None
    try:
        state = json.loads(decoder.__getstate__())
    except (TypeError, ValueError, AttributeError):
        return None
    return backend if state == _SENTENCEPIECE_DECODER else None


def _fallback_byte(piece: Optional[str]) -> Optional[int]:
    m = _FALLBACK_BYTE.fullmatch(piece) if piece is not None and len(piece) == 6 else None
    return int(m.group(1), 16) if m else None


def _sentencepiece_offsets(backend, token_ids: list[int]) -> list[tuple[int, int]]:
    """Exact offsets for the SentencePiece decoder, in O(n), without calling ``decode`` per token."""
    pieces = [backend.id_to_token(int(i)) for i in token_ids]
    offsets: list[tuple[int, int]] = []
    pos, i, n = 0, 0, len(pieces)
    while i < n:
        if _fallback_byte(pieces[i]) is None:
            width = 0 if pieces[i] is None else len(pieces[i].replace("\u2581", " "))
            offsets.append((pos, pos + width))
            pos += width
            i += 1
            continue
        j = i
        while j < n and _fallback_byte(pieces[j]) is not None:
            j += 1
        data = bytes(_fallback_byte(p) for p in pieces[i:j])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # the decoder writes one U+FFFD per byte piece of an invalid run
            offsets.extend((pos + k, pos + k + 1) for k in range(j - i))
            pos += j - i
            i = j
            continue
        owner = []  # owner[b] = index of the character holding byte b
        for k, ch in enumerate(text):
            owner.extend([k] * _utf8_width(ch))
        offsets.extend((pos + owner[b], pos + owner[b] + 1) for b in range(j - i))
        pos += len(text)
        i = j
    return offsets


def _incremental_offsets(tokenizer, token_ids: list[int]) -> list[tuple[int, int]]:
    """Generic offsets from prefix decodes; O(n^2) decoding, used only for non-ByteLevel tokenizers.

    Exact wherever decoding is prefix-stable (``decode(ids[:k])`` is a prefix of the full decode). Where it is not
    (byte-fallback pieces of one character, clean-up rules, ...), every token between the two surrounding stable
    prefixes gets their whole range, so a span is still covered, possibly by a few extra tokens.
    """
    full = tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    n = len(token_ids)
    stable_len: list[Optional[int]] = [0] + [None] * (n - 1) + [len(full)]  # by prefix length k = 0..n
    for k in range(1, n):
        prefix = tokenizer.decode(token_ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if full.startswith(prefix):
            stable_len[k] = len(prefix)
    # running max: keeps offsets monotone even if a decoder drops characters at a later token
    before, last = [], 0
    for k in range(n + 1):
        last = max(last, stable_len[k]) if stable_len[k] is not None else last
        before.append(last)
    after, nxt = [0] * (n + 1), len(full)
    for k in range(n, -1, -1):
        nxt = min(nxt, stable_len[k]) if stable_len[k] is not None else nxt
        after[k] = max(nxt, before[k])
    return [(before[i], after[i + 1]) for i in range(n)]


def token_char_offsets(tokenizer, token_ids: list[int]) -> list[tuple[int, int]]:
    """For each id, the [start, end) characters it contributes to the decoded string.

    The string is ``tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)``.
    Offsets are monotone (starts and ends never decrease) and together cover the whole string.

    - Byte-level BPE tokenizers (GPT-2/Qwen/Llama-3 style: a fast tokenizer whose decoder is ByteLevel) are handled
      exactly, from the tokens' bytes, in linear time. A character whose UTF-8 bytes are split across tokens
      belongs to every token carrying one of its bytes, so neighbouring ranges can share that character, and a
      token holding only a middle byte has the one-character range of that character. Invalid byte runs decode to
      U+FFFD like in ``decode``, owned by the tokens carrying their bytes. Ids unknown to the tokenizer decode to
      nothing and get an empty range.
    - SentencePiece-style tokenizers (Gemma, Llama-2: decoder ``▁`` -> space, byte fallback, fuse) are handled
      exactly too: a run of byte-fallback pieces decodes as one UTF-8 string (each character owned by the pieces
      carrying its bytes) or, if invalid, as one U+FFFD per piece, as ``tokenizers``' ByteFallback decoder does.
    - Other tokenizers: prefix decoding (quadratic, see ``_incremental_offsets``), exact where decoding is
      prefix-stable and approximate (wider, never narrower) at boundaries where it is not.
    """
    token_ids = [int(i) for i in token_ids]
    if not token_ids:
        return []
    backend = _backend_byte_level(tokenizer)
    if backend is not None:
        return _byte_level_offsets(backend, token_ids)
    backend = _backend_sentencepiece(tokenizer)
    if backend is not None:
        return _sentencepiece_offsets(backend, token_ids)
    return _incremental_offsets(tokenizer, token_ids)


def char_span_to_token_span(tokenizer, token_ids: list[int], char_start: int, char_end: int) -> tuple[int, int]:
    """The minimal [tok_start, tok_end) of ``token_ids`` covering every character of [char_start, char_end).

    Every token that owns any character of the span is included, e.g. a BPE token merging the tag's ``>`` with
    the first action character. Offsets refer to the decode described in :func:`token_char_offsets`; the action
    must have been parsed on exactly that string. An empty span, or one outside the decoded string, is a
    ValueError: there are no tokens to credit.
    """
    if char_end <= char_start:
        raise ValueError(f"empty character span [{char_start}, {char_end})")
    offsets = token_char_offsets(tokenizer, token_ids)
    n_chars = offsets[-1][1] if offsets else 0
    if char_start < 0 or char_end > n_chars:
        raise ValueError(f"character span [{char_start}, {char_end}) outside the decoded text of {n_chars} chars")
    # offsets are monotone: the first token ending after char_start and the last starting before char_end
    first = next(i for i, (_, b) in enumerate(offsets) if b > char_start)
    last = next(i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < char_end)
    return first, last + 1
