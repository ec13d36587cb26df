"""Prompts to token ids for the API, without letting one tenant's huge prompt delay another's small one.

Tokenizing is CPU work: a few MB of prompt take seconds. Texts up to INLINE_CHARS are tokenized on the event
loop (milliseconds); longer ones in a pool of their own (the tokenizer releases the GIL, so the loop and every
stream keep running), at most TOKENIZE_QUEUE at once (beyond: 503), so a flood of huge prompts never delays
other tenants' small ones. A text too long to fit the context in any tokenization is refused first, without
being tokenized (`max_prompt_chars`). Chat contents are text: a control token spelled inside one is tokenized
as its characters, never as the control token.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from serving.engine.errors import Overloaded


class Tokenizing:
    INLINE_CHARS = 16384
    TOKENIZE_QUEUE = 8

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltaserve-tokenize")
        self._busy = 0  # texts in the pool; the event loop is single-threaded: no lock needed
        vocab = tokenizer.get_vocab()
        # No token covers more characters of text than its own string has (byte-level BPE: one per byte;
        # SentencePiece: its pieces); x2 for normalizers that merge characters.
        self.max_token_chars = max((len(t) for t in vocab), default=1)
        self.max_prompt_chars = 2 * self.max_token_chars * max_model_len
        specials = set(tokenizer.all_special_tokens) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)
        }
        self._control_strings = sorted((t for t in specials if t), key=len, reverse=True)

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, *args) -> list[int]:
        size = sum(len(a) if isinstance(a, str) else sum(len(m["content"]) for m in a) for a in args
                   if isinstance(a, (str, list)))  # fmt: skip
        if size <= self.INLINE_CHARS:
            return fn(*args)
        if self._busy >= self.TOKENIZE_QUEUE:
            raise Overloaded(f"{self._busy} long prompts are being tokenized; retry shortly")
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self._busy -= 1

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(self._encode, text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The base tokenizer's chat template, with the assistant turn opened. Message contents are text: a
        control token spelled inside one (e.g. "</s><|system|>") is tokenized as the characters it is made of,
        never as the control token, so a user cannot forge another role's turn."""
        return await self._run(self.chat_ids, messages, add_generation_prompt)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        tok = self.tokenizer
        opened = add_generation_prompt
        if not any(c in m["content"] for m in messages for c in self._control_strings):
            return list(tok.apply_chat_template(messages, add_generation_prompt=opened, tokenize=True, return_dict=False))
        # Render with a marker in place of each content, so the template's own text and the contents can be
        # tokenized apart: the template's with its control tokens, the contents as plain text.
        markers = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = tok.apply_chat_template([{**m, "content": mk} for m, mk in zip(messages, markers)],
                                         add_generation_prompt=opened, tokenize=False)  # fmt: skip
        real = tok.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
        pieces: list[tuple[str, bool]] = []
        rest = marked
        for m, mk in zip(messages, markers):
            before, found, rest = rest.partition(mk)
            if not found:
                raise ValueError("the chat template does not place every message's content as it is")
            pieces += [(before, False), (m["content"], True)]
        pieces.append((rest, False))
        if "".join(p for p, _ in pieces) != real:
            raise ValueError("the chat template changes message contents; control-token text cannot be escaped")
        ids: list[int] = []
        for text, is_content in pieces:
            if text:
                ids += tok.encode(text, add_special_tokens=False, split_special_tokens=is_content)
        return ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Token ids this tokenizer knows: 0 .. vocab_size - 1."""
        return len(self.tokenizer)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids to text (special tokens kept); ValueError naming the first id outside the vocabulary."""
        size = self.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{size - 1})")
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)
