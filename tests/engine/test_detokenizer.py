"""IncrementalDetokenizer: no broken characters, stop strings held back and cut, special tokens, spacing."""

from __future__ import annotations

import json
import random

import pytest

from serving.engine.detokenizer import IncrementalDetokenizer
from tests.helpers import CORPUS, make_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, \u00fcber sch\u00f6n",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0 and \u65e5\u672c",
    "emoji \U0001f600\U0001f680 done \U0001f44d\U0001f3fd!",
    "def main():\n    print('hello world')\n    return 0\n",
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def sp_tok():
    """A Llama-like sentencepiece tokenizer: "\u2581" for spaces, byte fallback for characters it lacks."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    t.train_from_iterator([c for c in CORPUS if c.isascii()], trainer=trainer)
    t.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spec = json.loads(t.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):  # byte tokens are ordinary (non-special) vocabulary entries, as in Llama
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    t = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _run(det: IncrementalDetokenizer, ids: list[int], flush: bool = True) -> list[str]:
    chunks = [det.add(i) for i in ids]
    if flush:
        chunks.append(det.flush())
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_concatenation_equals_decode(tok, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, tok.encode("Hello there: "))
    chunks = _run(det, ids)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True) == text
    assert det.text == text
    assert det.token_ids == ids
    assert not det.stopped
    assert not any("\ufffd" in c for c in chunks)


def test_multibyte_characters_are_held_back(tok) -> None:
    ids = tok.encode("\U0001f600", add_special_tokens=False)
    assert len(ids) > 1  # the emoji spans several tokens
    det = IncrementalDetokenizer(tok, [])
    assert [det.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.add(ids[-1]) == "\U0001f600"


def test_prompt_ending_in_multibyte_character(tok) -> None:
    prompt = tok.encode("na\u00efve \U0001f600", add_special_tokens=False)
    ids = tok.encode("\u65e5\u672c \u00e9t\u00e9", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt)
    assert "".join(_run(det, ids)) == "\u65e5\u672c \u00e9t\u00e9"


def test_incomplete_final_character_is_released_at_the_end_as_decode_renders_it(tok) -> None:
    ids = tok.encode("ab \u65e5\u672c", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [])
    chunks = _run(det, ids[:-1], flush=False)  # the last character lacks its final byte: held back
    assert "".join(chunks) == "ab \u65e5"
    assert not any("\ufffd" in c for c in chunks)
    tail = det.flush()  # the request ended: those bytes will never complete
    assert "".join(chunks) + tail == tok.decode(ids[:-1]) and tail.startswith("\ufffd")
    assert det.flush() == ""  # idempotent


def test_random_token_streams_match_decode(tok) -> None:
    rng = random.Random(0)
    specials = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in specials]
    for _ in range(30):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 25))]
        det = IncrementalDetokenizer(tok, [rng.choice(pool) for _ in range(3)])
        assert "".join(_run(det, ids)) == tok.decode(ids)


def test_special_tokens_skipped(tok) -> None:
    a = tok.encode("hello ", add_special_tokens=False)
    b = tok.encode("world", add_special_tokens=False)
    ids = [1, *a, tok.eos_token_id, *b]
    det = IncrementalDetokenizer(tok, [1, *a])
    assert "".join(_run(det, ids)) == "hello world" == tok.decode(ids, skip_special_tokens=True)
    det = IncrementalDetokenizer(tok, [1, *a], skip_special_tokens=False)
    assert "".join(_run(det, ids)) == tok.decode(ids, skip_special_tokens=False) == "<s>hello </s>world"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("brown fox", "The quick "),  # several tokens, in the middle
        ("The", ""),  # at the very start
        ("dog.", "The quick brown fox jumps over the lazy "),  # at the end
        ("k b", "The quic"),  # across token boundaries
    ],
)
def test_stop_string(tok, stop: str, expected: str) -> None:
    text = "The quick brown fox jumps over the lazy dog. And more text after it."
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=[stop])
    chunks = []
    for i in ids:
        chunks.append(det.add(i))
        if det.stopped:
            break
    assert det.stopped and det.stop_string == stop
    assert "".join(chunks) == det.text == expected
    assert not any(stop in c for c in chunks)
    assert det.add(ids[-1]) == "" and det.flush() == ""  # nothing after a stop
    assert det.token_ids[-1] == ids[-1]


def test_stop_string_multibyte(tok) -> None:
    text = "na\u00efve \u65e5\u672c\u8a9e\u306e\u6587\u7ae0"
    det = IncrementalDetokenizer(tok, [], stop=["\u8a9e\u306e"])
    chunks = []
    for i in tok.encode(text, add_special_tokens=False):
        chunks.append(det.add(i))
        if det.stopped:
            break
    assert det.stopped and "".join(chunks) == "na\u00efve \u65e5\u672c"
    assert not any("\ufffd" in c for c in chunks)


def test_first_completed_stop_string_wins(tok) -> None:
    ids = tok.encode("The quick brown fox jumps", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["jumps", "quick brown fox", "brown"])
    _run(det, ids, flush=False)
    assert det.stopped and det.text == "The quick " and det.stop_string == "brown"
    # two stop strings completed by the same token: the one that starts first wins
    det = IncrementalDetokenizer(tok, [], stop=["ick", "quick"])
    _run(det, ids, flush=False)
    assert det.stopped and det.text == "The " and det.stop_string == "quick"


def test_stop_strings_starting_at_the_same_place_the_one_listed_first_wins(tok) -> None:
    ids = tok.encode("The quick brown fox", add_special_tokens=False)  # " qu" is one token: both stops at once
    for stop in (["qu", "q"], ["q", "qu"]):
        det = IncrementalDetokenizer(tok, [], stop=stop, include_stop_str=True)
        _run(det, ids, flush=False)
        assert det.stopped and det.stop_string == stop[0] and det.text == "The " + stop[0]


def test_held_back_prefix_released_when_no_match(tok) -> None:
    text = "The quick brown fox jumps over"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["fox!", "over the top"])
    emitted = ""
    held_at_some_point = False
    for n, i in enumerate(ids, 1):
        emitted += det.add(i)
        decoded = tok.decode(ids[:n])
        assert decoded.startswith(emitted)
        if decoded.endswith("fox"):
            assert not emitted.endswith("fox")  # "fox" could start "fox!": held back
            held_at_some_point = True
    assert held_at_some_point
    assert emitted == "The quick brown fox jumps "  # "over" could start "over the top"
    assert det.flush() == "over"  # the end of the request releases it
    assert det.text == text and not det.stopped and det.stop_string is None
    assert det.add(ids[0]) == "" and det.flush() == "" and det.text == text  # nothing after the end
    assert det.token_ids == [*ids, ids[0]]


@pytest.mark.parametrize(
    ("text", "stop", "expected", "which"),
    [
        ("Hello world", ["l"], "He", "l"),  # twice in one token ("ll"): its first occurrence
        ("Hello world", ["l", "zzz"], "He", "l"),  # a stop string that never appears changes nothing
        ("banana", ["a", "n"], "b", "a"),  # two in one token ("an"): the one that starts first
        ("banana", ["n", "a"], "b", "a"),
    ],
)
def test_the_first_occurrence_in_a_token_ends_the_text(tok, text, stop, expected, which) -> None:
    det = IncrementalDetokenizer(tok, [], stop=stop)
    _run(det, tok.encode(text, add_special_tokens=False), flush=False)
    assert det.stopped and (det.text, det.stop_string) == (expected, which)


def test_stop_honoured_in_flushed_text(tok) -> None:
    ids = tok.encode("abc \u65e5", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["c"])
    _run(det, ids)
    assert det.stopped and det.text == "ab"


def test_sentencepiece_spacing(sp_tok) -> None:
    prompt = sp_tok.encode("The fox said:", add_special_tokens=False)
    for text in ["Hello world, caf\u00e9 \u65e5\u672c \U0001f600", "  two  spaces", "over the lazy dog."]:
        ids = sp_tok.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(sp_tok, prompt)
        chunks = _run(det, ids)
        full = sp_tok.decode(prompt + ids)
        assert "".join(chunks) == full[len(sp_tok.decode(prompt)) :]
        assert "".join(chunks).startswith(" ")  # the word boundary after the prompt is kept
        assert not any("\ufffd" in c for c in chunks)
        # without a prompt the leading space is stripped, as a plain decode does
        det = IncrementalDetokenizer(sp_tok, [])
        assert "".join(_run(det, ids)) == sp_tok.decode(ids)


@pytest.mark.parametrize(("stop", "expected"), [("brown fox", "The quick brown fox"), ("k b", "The quick b"),
                                                ("dog.", "The quick brown fox jumps over the lazy dog.")])  # fmt: skip
def test_include_stop_str_ends_the_text_just_after_it(tok, stop, expected) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog. And more.", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=[stop], include_stop_str=True)
    chunks = []
    for i in ids:
        chunks.append(det.add(i))
        if det.stopped:
            break
    assert det.stopped and det.stop_string == stop and "".join(chunks) == det.text == expected


def test_stop_strings_are_looked_for_only_from_the_min_tokens_th_token_on(tok) -> None:
    text = "ab ab ab ab ab ab"
    ids = tok.encode(text, add_special_tokens=False)
    texts = [tok.decode(ids[: n + 1]) for n in range(len(ids))]
    first = next(n for n, t in enumerate(texts) if "ab" in t)  # the token completing the first "ab"
    det = IncrementalDetokenizer(tok, [], stop=["ab"], min_tokens=first + 2)
    _run(det, ids, flush=False)
    assert det.stopped
    # everything the first first+1 tokens produced is out, as it came; the first "ab" completed later ends it
    kept = det.text
    assert kept.startswith(texts[first]) and len(kept) > len(texts[first]) and text.startswith(kept)
    assert kept + "ab" in text and "ab" not in kept[len(texts[first]):]
    plain = IncrementalDetokenizer(tok, [], stop=["ab"])
    _run(plain, ids, flush=False)
    assert plain.text == text[: text.index("ab")]


def test_nothing_is_released_after_a_stop_string_not_even_at_the_end(tok) -> None:
    """The request ends after its stop string: flush() must not release the text that followed it."""
    det = IncrementalDetokenizer(tok, [], stop=["fox"])
    out = "".join(det.add(t) for t in tok.encode("The quick brown fox jumps over the lazy dog."))
    assert det.stopped and out == "The quick brown "
    assert det.flush() == "" and det.flush() == ""
