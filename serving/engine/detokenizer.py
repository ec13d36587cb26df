"""Incremental detokenization with stop strings: token ids in, final text chunks out.

Two things are held back from the stream until they are settled:
  * an incomplete UTF-8 character: byte-level BPE and byte-fallback sentencepiece split multi-byte characters
    across tokens, and decoding a partial one gives "\\ufffd";
  * a tail that could be the beginning of a stop string.

Spacing follows vLLM's prefix_offset / read_offset scheme: every step decodes a small window that starts a few
tokens back (``ids[prefix_offset:]``) and emits what it adds to the decode of the part already emitted
(``ids[prefix_offset:read_offset]``). Tokenizers whose decoders depend on the neighbours (sentencepiece's leading
"\u2581", byte-level's merged bytes) therefore decode each token in context; the prompt's last few tokens are the
initial context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INITIAL_CONTEXT_TOKENS = 5  # prompt tokens decoded as context before the first generated one
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, a token at a time.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode``, ``all_special_ids``).
        prompt_token_ids: the prompt; its last few tokens give the decoding context of the first generated token.
        stop: stop strings; the output ends just before the first occurrence of any of them (never emitted).
        skip_special_tokens: leave special tokens out of the text.
        include_stop_str: the output ends just after the stop string instead (it is emitted).
        min_tokens: stop strings are looked for only in the text of the ``min_tokens``-th generated token on
            (the text before is emitted as it comes).

    Invariant: ``text`` == the concatenation of everything :meth:`add` and :meth:`flush` returned.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._include_stop = include_stop_str
        self._min_tokens = min_tokens
        self._skip_special = skip_special_tokens
        self._special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1  # longest proper prefix of a stop

        context = [t for t in prompt_token_ids if t not in self._special_ids][-INITIAL_CONTEXT_TOKENS:]
        while context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context.pop()  # a prompt ending mid-character: its partial bytes must not merge with generated ones
        self._ids: list[int] = list(context)  # decoding window source: context + generated (specials filtered)
        self._prefix_offset = 0  # start of the window decoded each step
        self._read_offset = len(context)  # ids before this are already decoded into _pending/_text

        self._token_ids: list[int] = []
        self._pending = ""  # decoded text held back because it may start a stop string
        self._text = ""
        self._stopped = False
        self._stop_string: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the returns of add/flush)."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids, in order (special tokens included)."""
        return self._token_ids

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared; ``text`` then ends just before it (just after it with
        include_stop_str)."""
        return self._stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that matched, or None."""
        return self._stop_string

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)

    def _decode_new(self, final: bool) -> str:
        """Text the tokens after ``read_offset`` add; "" while it ends in an incomplete character (unless final)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # maybe the first bytes of a character the next token completes: hold back
        # At the end, bytes that never formed a character are released as decode() renders them (U+FFFD),
        # so the streamed text always equals tokenizer.decode(generated ids).
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, delta: str, final: bool) -> str:
        """Appends ``delta`` to the held-back text, cuts at a stop string, returns what is now final."""
        pending = self._pending + delta
        if len(self._token_ids) < self._min_tokens:  # too early for a stop: everything is final as it comes
            self._pending = ""
            self._text += pending
            return pending
        cut, which = -1, None
        for s in self._stop:
            at = pending.find(s)
            if at >= 0 and (cut < 0 or at < cut):
                cut, which = at, s
        if cut >= 0:
            assert which is not None
            out = pending[: cut + len(which)] if self._include_stop else pending[:cut]
            self._pending = ""
            self._stopped = True
            self._stop_string = which
        elif final:
            out, self._pending = pending, ""
        else:
            hold = 0
            for k in range(min(self._max_hold, len(pending)), 0, -1):
                tail = pending[-k:]
                if any(s.startswith(tail) for s in self._stop):
                    hold = k
                    break
            out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self._text += out
        return out

    def add(self, token_id: int) -> str:
        """Appends one generated token; returns the new text that is now final (possibly "").

        Never returns a broken character nor any part of a stop string. After a stop string matched (``stopped``),
        or after :meth:`flush`, the token is recorded and "" returned.
        """
        self._token_ids.append(token_id)
        if self._stopped or self._finished:
            return ""
        if token_id in self._special_ids:
            return ""
        self._ids.append(token_id)
        delta = self._decode_new(final=False)
        if not delta:
            return ""
        return self._release(delta, final=False)

    def flush(self) -> str:
        """Ends the request (EOS, length, ...): releases all held-back text, a trailing incomplete character as
        decode() renders it (U+FFFD), so the concatenated output equals tokenizer.decode(generated ids).

        Stop strings are still honoured in the released text. Later calls return "".
        """
        if self._stopped or self._finished:
            return ""
        self._finished = True
        return self._release(self._decode_new(final=True), final=True)
