"""Char-level BERT tokenizer for the Chinese RoFormer(-Sim) models, built on the `tokenizers` library.

BertNormalizer (clean text, lower-case, spaces around every CJK char), BertPreTokenizer (whitespace and
punctuation), WordPiece over the vocab.txt (so Chinese text becomes one token per char; Latin words fall
back to word pieces), and the BERT template `[CLS] a [SEP] b [SEP]` with segment ids 0 / 1.
"""
from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from gen_jax.errors import ConfigError, DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum() and not ch.isspace())


class CharTokenizer:
    """BERT WordPiece tokenizer over a vocab.txt (one token per line, id = line number)."""

    def __init__(self, vocab_path: str, *, lowercase: bool = True):
        from tokenizers import BertWordPieceTokenizer

        if not os.path.exists(vocab_path):
            raise DataError(f"vocab file {vocab_path} not found; pass the vocab.txt of the checkpoint or make one "
                            "with gen_jax.roformer.tokenizer.build_vocab")
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = [line.rstrip("\n") for line in f]
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise DataError(f"vocab {vocab_path} lacks special tokens {missing}; BERT vocabs need all of "
                            f"{list(SPECIAL_TOKENS)}")
        self._tok = BertWordPieceTokenizer(vocab_path, lowercase=lowercase, handle_chinese_chars=True,
                                           strip_accents=None if lowercase else False, clean_text=True)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.token_to_id[t] for t in SPECIAL_TOKENS)
        self.special_ids = frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """Tokens of `text` without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, text_pair: str | None = None, *, maxlen: int | None = None
               ) -> tuple[list[int], list[int]]:
        """`[CLS] text [SEP] (pair [SEP])` -> (token ids, segment ids); with `maxlen` the longer of the two
        texts is cut from its end first, so the whole row fits maxlen."""
        if maxlen is not None:
            self._tok.enable_truncation(maxlen, strategy="longest_first")
        else:
            self._tok.no_truncation()
        enc = self._tok.encode(text, text_pair) if text_pair is not None else self._tok.encode(text)
        return list(enc.ids), list(enc.type_ids)

    def tokenize_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """For each text: token ids (no specials, no truncation) and each token's (start, end) char span in
        that text. One call of the library's batch encoder for all texts (fast data preparation)."""
        self._tok.no_truncation()
        return [(list(e.ids), list(e.offsets))
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, maxlen: int,
                     pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Padded int32 arrays `token_ids`, `segment_ids` and bool `padding_mask` [N, pad_to or longest row]."""
        if pairs is not None and len(pairs) != len(texts):
            raise ConfigError(f"{len(texts)} texts but {len(pairs)} pairs; pass one pair per text")
        rows = [self.encode(t, None if pairs is None else pairs[i], maxlen=maxlen) for i, t in enumerate(texts)]
        T = pad_to or max(len(r[0]) for r in rows)
        ids = np.full((len(rows), T), self.pad_id, np.int32)
        seg = np.zeros((len(rows), T), np.int32)
        for i, (a, s) in enumerate(rows):
            ids[i, :len(a)], seg[i, :len(s)] = a[:T], s[:T]
        return {"token_ids": ids, "segment_ids": seg, "padding_mask": ids != self.pad_id}

    def decode(self, ids: Iterable[int], *, stop_at_sep: bool = False) -> str:
        """Text of `ids`, special tokens dropped, "##" pieces glued, no spaces next to CJK chars."""
        out = ""
        prev_word = False
        for i in ids:
            i = int(i)
            if stop_at_sep and i == self.sep_id:
                break
            if i in self.special_ids and i != self.unk_id or i < 0 or i >= len(self.vocab):
                continue
            tok = self.vocab[i]
            if tok.startswith("##"):
                out += tok[2:]
                continue
            is_word = not (len(tok) == 1 and (_is_cjk(tok) or _is_punct(tok)))
            if out and is_word and prev_word:
                out += " "
            out += tok
            prev_word = is_word
        return out


def build_vocab(texts: Iterable[str], path: str, size: int, *, min_frequency: int = 1,
                lowercase: bool = True) -> str:
    """Train a BERT WordPiece vocab (specials [PAD] [UNK] [CLS] [SEP] [MASK] first, ids 0-4) on `texts` and
    write it to `path` (a vocab.txt, or a folder that gets one). Chinese chars always stay single tokens."""
    from tokenizers import BertWordPieceTokenizer

    if size <= len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab size {size} leaves no room beyond the {len(SPECIAL_TOKENS)} special tokens")
    tok = BertWordPieceTokenizer(lowercase=lowercase, handle_chinese_chars=True, clean_text=True,
                                 strip_accents=None if lowercase else False)
    tok.train_from_iterator(iter(texts), vocab_size=size, min_frequency=min_frequency, limit_alphabet=size,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    if os.path.isdir(path):
        path = os.path.join(path, "vocab.txt")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t, _ in vocab)
    return path
