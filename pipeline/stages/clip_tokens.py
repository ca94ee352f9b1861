"""CLIP's caption tokenizer, with the byte-pair merges run by Hugging Face `tokenizers` (Rust).

open_clip's `SimpleTokenizer` spends ~57 us per caption on a 2-core machine (1,024 captions in 58 ms),
about half of it in ftfy's text repair and the rest in Python's BPE loop: for the alignment stage that
is more host time than its GPU text-tower forward of the same captions. `FastClipTokenizer` gives the
same token ids from open_clip's own vocabulary and merge ranks:

- a caption of printable ASCII without `&` skips ftfy and HTML unescaping (neither changes such a
  string), is whitespace-collapsed and lower-cased as open_clip does, and goes through one
  `tokenizers` BPE (open_clip's split pattern, GPT-2's byte alphabet, the `</w>` end-of-word suffix)
  for the whole batch;
- any other caption (accents, emoji, tabs, HTML entities) takes open_clip's own `encode`, so text
  that ftfy would repair is still repaired; so does one naming a special token (`<end_of_text>`):
  open_clip's pattern reads it as that token only where a match starts at its `<` ('a <end_of_text>'
  but not '!<end_of_text>', where its punctuation run takes '!<'), which `tokenizers`' added tokens
  cannot express.

Sequences are framed, truncated and padded as open_clip frames them (start and end tokens, the last
kept token replaced by the end token when cut, zeros after). Tests compare both on many captions.
"""

from __future__ import annotations

import re

_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e]*")  # printable ASCII except '&'
_SPACES = re.compile(r"\s+")
# open_clip's split of a cleaned caption into words (after its two special tokens)
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_tokenizer(model_name: str):
    """open_clip's tokenizer for `model_name`, as a `FastClipTokenizer` where it is CLIP's plain BPE
    tokenizer and `tokenizers` is installed; otherwise open_clip's own (other tokenizers, or a
    machine without `tokenizers`: the GPU bench machine)."""
    import open_clip

    tok = open_clip.get_tokenizer(model_name)
    return FastClipTokenizer.wrap(tok) or tok


class FastClipTokenizer:
    """Token ids [n, context_length] (torch.long) of captions, equal to open_clip's SimpleTokenizer's."""

    def __init__(self, simple):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        self.simple = simple
        self.context_length = simple.context_length
        self.sot, self.eot = simple.sot_token_id, simple.eot_token_id
        merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.__getitem__)
        bpe = models.BPE(
            vocab=dict(simple.encoder),
            merges=merges,
            end_of_word_suffix="</w>",
            continuing_subword_prefix="",
            fuse_unk=False,
        )
        self.backend = Tokenizer(bpe)
        self.backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # captions naming these take open_clip's path (see the module docstring)
        self.specials = [simple.decoder[i] for i in simple.all_special_ids]

    @classmethod
    def wrap(cls, tok):
        """A FastClipTokenizer over `tok` if `tok` is open_clip's plain CLIP tokenizer (lower-case
        cleaning, truncation) and `tokenizers` is installed; else None."""
        try:
            import tokenizers  # noqa: F401 - only whether it is installed
            from open_clip.tokenizer import SimpleTokenizer, _clean_lower
        except ImportError:
            return None
        plain = isinstance(tok, SimpleTokenizer) and getattr(tok, "reduction_fn", None) is None
        if not plain or getattr(tok, "clean_fn", None) is not _clean_lower:
            return None
        return cls(tok)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each caption's BPE ids, without start and end tokens (open_clip's `encode` of each)."""
        ids: list[list[int] | None] = [None] * len(texts)
        fast, cleaned = [], []
        for i, text in enumerate(texts):
            clean = _SPACES.sub(" ", text).strip().lower() if _PLAIN.fullmatch(text) else None
            if clean is not None and not any(s in clean for s in self.specials):
                fast.append(i)
                cleaned.append(clean)
            else:
                ids[i] = self.simple.encode(text)
        encoded = self.backend.encode_batch_fast(cleaned, add_special_tokens=False)  # no offsets
        for i, enc in zip(fast, encoded, strict=True):
            ids[i] = enc.ids
        return ids

    def __call__(self, texts, context_length: int | None = None):
        import numpy as np
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        n = context_length or self.context_length
        out = np.zeros((len(texts), n), np.int64)
        for row, ids in enumerate(self.encode_batch(texts)):
            # cut: the last kept token becomes the end token (n = 1 keeps only the end token)
            seq = [self.sot, *ids[: max(n - 2, 0)], self.eot][:n]
            seq[-1] = self.eot
            out[row, : len(seq)] = seq
        return torch.from_numpy(out)
