"""Char-level BERT tokenizer (tokenizers library) and vocab building."""
import numpy as np
import pytest

from gen_jax.errors import DataError
from gen_jax.roformer.tokenizer import SPECIAL_TOKENS, CharTokenizer, build_vocab

CORPUS = ["我喜欢北京，今天天气不错。", "今天天气很好", "我不喜欢北京 hello world", "RoFormer是一个好模型!"] * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return CharTokenizer(build_vocab(CORPUS, str(tmp_path_factory.mktemp("vocab")), 300))


def test_build_vocab_puts_specials_first_and_keeps_every_chinese_char(tok):
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    for ch in "".join(CORPUS):
        if "\u4e00" <= ch <= "\u9fff":
            assert ch in tok.token_to_id


def test_chinese_text_is_one_token_per_char_and_round_trips(tok):
    text = "今天天气不错，我喜欢北京。"
    assert tok.tokenize(text) == list(text)
    ids, seg = tok.encode(text)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) == len(text) + 2 and set(seg) == {0}
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("RoFormer是一个好模型!")[0]) == "roformer是一个好模型!"  # lower-cased
    assert tok.tokenize("北京X") == ["北", "京", "[UNK]"]


def test_pairs_segments_truncation_and_padding(tok):
    ids, seg = tok.encode("我喜欢北京", "今天天气很好")
    assert seg == [0] * 7 + [1] * 7
    assert ids[6] == tok.sep_id and ids[-1] == tok.sep_id
    # the longer side loses a token at a time (ties: the first), as bert4keras' truncate_sequences
    ids, seg = tok.encode("我喜欢北京", "今天天气很好不错", maxlen=12)
    assert len(ids) == 12 and ids[5] == tok.sep_id
    assert tok.decode(ids[:6]) == "我喜欢北" and tok.decode(ids[6:]) == "今天天气很" and seg.count(1) == 6
    b = tok.encode_batch(["我喜欢北京", "好"], maxlen=10, pad_to=9)
    assert b["token_ids"].shape == (2, 9) and b["token_ids"].dtype == np.int32
    assert b["padding_mask"].sum(1).tolist() == [7, 3]
    assert (b["token_ids"][~b["padding_mask"]] == tok.pad_id).all()
    assert tok.decode(list(b["token_ids"][1]) + [tok.sep_id, 5], stop_at_sep=True) == "好"


def test_a_vocab_without_special_tokens_is_rejected(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\[PAD\]"):
        CharTokenizer(str(p))
