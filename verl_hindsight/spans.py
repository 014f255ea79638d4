"""Find the action in an assistant message and map its characters to the exact generated tokens.

Hindsight credit goes to action tokens only. The ids a model generated need not be the canonical tokenization
of their text, so spans are computed on the generated ids themselves: every character offset refers to
``tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)``, and the
caller must parse the action on that same string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class ParsedAction:
    text: Optional[str]  # the action to execute (stripped); None when invalid
    char_span: Optional[tuple[int, int]]  # [start, end) of the stripped action text in the message
    error: Optional[str]  # None, "missing_tag", "empty_action", "truncated_action"
    flags: frozenset[str] = field(default_factory=frozenset)  # subset of {"unclosed", "multiple", "truncated"}


def _ignored_regions(text: str, ignore_inside: tuple[str, ...]) -> list[tuple[int, int]]:
    regions = []
    for name in ignore_inside:
        pattern = re.compile(rf"<{re.escape(name)}>(.*?)(</{re.escape(name)}>|$)", re.DOTALL)
        regions += [(m.start(), m.end()) for m in pattern.finditer(text)]
    return regions


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def parse_tagged_action(text: str, tag: str = "action", *, truncated: bool = False,
                        ignore_inside: tuple[str, ...] = ("think",)) -> ParsedAction:
    """The action inside ``<tag>...</tag>``.

    Rules:
    - tags inside an ``ignore_inside`` block (``<think>...</think>``, or an unclosed ``<think>`` running to the
      end) are ignored: planning an action in the reasoning is not acting;
    - several complete actions outside reasoning: the last one counts, flagged "multiple";
    - an opening tag never closed: if the generation was ``truncated`` by the length limit the action is invalid
      ("truncated_action") but its clipped span is kept (flag "truncated"); otherwise the rest of the message is
      the action (flag "unclosed"; the released SERL code accepts this too);
    - no tag: "missing_tag"; a tag with only whitespace: "empty_action". Matching is exact and case-sensitive.
    """
    ignored = _ignored_regions(text, ignore_inside)

    def outside(pos: int) -> bool:
        return not any(a <= pos < b for a, b in ignored)

    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    complete = [m for m in re.finditer(rf"{re.escape(open_tag)}(.*?){re.escape(close_tag)}", text, re.DOTALL)
                if outside(m.start())]
    flags: set[str] = set()
    opens = [m.start() for m in re.finditer(re.escape(open_tag), text) if outside(m.start())]
    last_complete_end = complete[-1].end() if complete else -1
    dangling = [p for p in opens if p >= last_complete_end]
    if dangling:  # an opening tag after the last complete action, never closed
        start = dangling[0] + len(open_tag)
        span = _strip_span(text, start, len(text))
        if truncated:
            return ParsedAction(None, span if span[1] > span[0] else None, "truncated_action",
                                frozenset({"truncated"}))
        if span[1] > span[0]:
            flags.add("unclosed")
            if complete:
                flags.add("multiple")
            return ParsedAction(text[span[0]:span[1]], span, None, frozenset(flags))
        if not complete:
            return ParsedAction(None, None, "empty_action", frozenset({"unclosed"}))
    if not complete:
        return ParsedAction(None, None, "missing_tag", frozenset({"truncated"} if truncated else set()))
    if len(complete) > 1:
        flags.add("multiple")
    m = complete[-1]
    span = _strip_span(text, m.start(1), m.end(1))
    if span[1] == span[0]:
        return ParsedAction(None, None, "empty_action", frozenset(flags))
    return ParsedAction(text[span[0]:span[1]], span, None, frozenset(flags))


# ---------------------------------------------------------------------------- character -> token spans

def _byte_decoder():
    """GPT-2's printable-unicode <-> byte table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def _token_bytes(tokenizer, token_ids: list[int]) -> list[bytes]:
    added = {tid: tok.content for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    out = []
    for tid, piece in zip(token_ids, pieces):
        if tid in added:
            out.append(added[tid].encode("utf-8"))
        else:
            out.append(bytes(_BYTE_DECODER[ch] for ch in piece))
    return out


def _byte_level_offsets(tokenizer, token_ids: list[int]) -> list[tuple[int, int]]:
    """Feed each token's bytes to an incremental UTF-8 decoder (lossy, like the tokenizer's own decode).

    A token's characters start at the next character to be emitted; if it leaves bytes pending (a character
    split across tokens), its range extends over that character too. Added/special tokens are decoded on their
    own by the tokenizer, so pending bytes are flushed before them.
    """
    import codecs

    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    emitted = 0
    offsets = []
    for tid, piece in zip(token_ids, _token_bytes(tokenizer, token_ids)):
        if tid in added:
            emitted += len(decoder.decode(b"", final=True))
            decoder.reset()
            offsets.append((emitted, emitted + len(piece.decode("utf-8"))))
            emitted = offsets[-1][1]
            continue
        start = emitted
        emitted += len(decoder.decode(piece))
        pending = bool(decoder.getstate()[0])
        offsets.append((start, emitted + 1 if pending else emitted))
    tail = len(decoder.decode(b"", final=True))
    if tail and offsets:  # a dangling partial character at the very end becomes replacement character(s)
        last_start = offsets[-1][0]
        offsets[-1] = (last_start, emitted + tail)
    return offsets


def token_char_offsets(tokenizer, token_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) characters each id contributes to the decoded string (see module docstring).

    Byte-level BPE (exact): offsets come from the tokens' bytes. A character whose UTF-8 bytes are split across
    tokens belongs to every token carrying one of its bytes, so neighbouring ranges may overlap by that
    character. Other tokenizers: incremental decoding, which is exact whenever decoding is prefix-stable.
    """
    if not token_ids:
        return []
    if _is_byte_level(tokenizer):
        return _byte_level_offsets(tokenizer, token_ids)
    offsets, prev = [], 0
    for k in range(1, len(token_ids) + 1):
        cur = len(tokenizer.decode(token_ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        offsets.append((min(prev, cur), cur))
        prev = cur
    return offsets


def char_span_to_token_span(tokenizer, token_ids: list[int], char_start: int, char_end: int) -> tuple[int, int]:
    """Minimal [tok_start, tok_end) covering every character of [char_start, char_end)."""
    if char_end <= char_start:
        raise ValueError(f"empty character span [{char_start}, {char_end})")
    offsets = token_char_offsets(tokenizer, token_ids)
    hits = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start]
    if not hits:
        raise ValueError(f"character span [{char_start}, {char_end}) is outside the decoded tokens")
    return hits[0], hits[-1] + 1
