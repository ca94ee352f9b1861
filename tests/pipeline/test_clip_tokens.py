"""The alignment stage's caption tokenizer gives open_clip's token ids, faster (its BPE in Rust)."""

from __future__ import annotations

import string
import sys

import numpy as np
import open_clip
import pytest

from pipeline.stages.clip_tokens import FastClipTokenizer, clip_tokenizer

EDGE_CASES = [
    "",
    "   ",
    "a",
    "A Cartoon Girl With RED Hair",
    "it's the dog's ball; they're here, we've gone, I'm off, you'll see, he'd go",
    "IT'S LOUD",
    "3.14159 and 42nd street, 1999!!",
    "<start_of_text> a cat <end_of_text>",
    "a <START_OF_TEXT> b",
    # open_clip reads a special token only where a match starts at its '<': here '!<' is one word
    "!<start_of_text>",
    "a cat.<end_of_text>",
    "(<END_OF_TEXT>)",
    "<<end_of_text>>",
    "double  spaces   and trailing ",
    'punctuation...?!;:--()[]{}<>@#$%^*_+=|\\/~`"',
    "word " * 100,  # cut at 77 tokens, the end token last
    "x" * 500,
    # not printable ASCII, or with '&': open_clip's own path (ftfy, HTML unescaping)
    "café naïve façade",
    "Ã©tÃ© mojibake",
    "fish &amp; chips &lt;b&gt;",
    "tabs\tand\nnewlines\r\n",
    "emoji 😀 and ＦＵＬＬ width",
    "a\u00a0non-breaking space",
    "“curly quotes” and ‘apostrophes’",
]


def _random_ascii(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(string.printable))
    return ["".join(rng.choice(alphabet, rng.integers(0, 160))) for _ in range(n)]


def _captions(n: int, seed: int = 1) -> list[str]:
    from pipeline.bench_models_gpu import CAPTION_WORDS

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(CAPTION_WORDS, rng.integers(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizers():
    ref = open_clip.get_tokenizer("ViT-L-14")
    fast = clip_tokenizer("ViT-L-14")
    assert isinstance(fast, FastClipTokenizer)
    return ref, fast


def test_same_token_ids_as_open_clip(tokenizers):
    import torch

    ref, fast = tokenizers
    texts = EDGE_CASES + _captions(300) + _random_ascii(800)
    want, got = ref(texts), fast(texts)
    assert got.dtype == torch.long and got.shape == (len(texts), 77)
    mismatched = [t for t, a, b in zip(texts, want, got, strict=True) if not torch.equal(a, b)]
    assert mismatched == []
    # one caption as a string, and another context length (truncation keeps the end token last)
    assert torch.equal(fast("A cat."), ref("A cat."))
    for n in (1, 2, 8):
        assert torch.equal(fast(texts, context_length=n), ref(texts, context_length=n)), n
    long = fast(["word " * 100])[0]
    assert int(long[-1]) == fast.eot and int(long[0]) == fast.sot


def test_plain_captions_take_the_rust_path_and_others_open_clips(tokenizers, monkeypatch):
    _, fast = tokenizers
    seen = []
    real = fast.simple.encode
    monkeypatch.setattr(fast.simple, "encode", lambda text: seen.append(text) or real(text))
    fast(["a plain caption, it's fine", "café", "a &amp; b", "tab\there"])
    assert seen == ["café", "a &amp; b", "tab\there"]


def test_other_tokenizers_and_a_machine_without_tokenizers_keep_open_clips(monkeypatch):
    from open_clip.tokenizer import SimpleTokenizer

    assert FastClipTokenizer.wrap(SimpleTokenizer(reduction_mask="simple")) is None  # another framing
    assert FastClipTokenizer.wrap(SimpleTokenizer(clean="whitespace")) is None  # another cleaning
    assert FastClipTokenizer.wrap(object()) is None
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    assert isinstance(clip_tokenizer("ViT-L-14"), SimpleTokenizer)


def test_bench_measures_both_tokenizers_on_the_same_captions(tokenizers):
    from pipeline.bench_models_gpu import tokenizer_row

    ref, fast = tokenizers
    row = tokenizer_row(fast, n=64, repeats=1)
    assert row["captions"] == 64 and row["same_ids"] is True
    assert row["open_clip_captions_per_s"] > 0 and row["fast_captions_per_s"] > 0
    assert row["speedup"] == pytest.approx(
        row["fast_captions_per_s"] / row["open_clip_captions_per_s"], rel=0.01
    )
    assert tokenizer_row(ref) is None  # open_clip's own: nothing to compare
