"""The RoFormer-Sim launcher: weakly supervised pairs, row layout, retrieval metrics, and an end-to-end run
of `python -m experiments.roformer_sim --preset tiny` that resumes."""
import dataclasses
import json
import os

import numpy as np
import pytest

from gen_jax.roformer.tokenizer import CharTokenizer, build_vocab
from gen_jax.roformer_sim.configs import DataConfig
from gen_jax.roformer_sim.training import (article_pairs, bag_of_chars, heldout_pairs, pair_arrays,
                                           retrieval_metrics, word_starts)

DOCS = [
    "北京今天天气很好。北京今天天气不错！我们明天去上海开会。上海明天有大雨吗？１２３４５６７８９０１２。",
    "他们在北京开会讨论经济。他们在上海开会讨论教育。（新华社记者张三摄）小明喜欢吃苹果和香蕉。",
]


def _jaccard(a, b):  # the oracle: char-set overlap written out directly
    return len(set(a) & set(b)) / len(set(a) | set(b))


def test_pairs_are_two_prose_sentences_of_one_article_within_the_overlap_band():
    cfg = DataConfig(min_chars=6, maxlen=20, min_overlap=0.3, max_overlap=0.8, max_pairs_per_sentence=1)
    pairs = article_pairs(DOCS, cfg)
    sents = [set(d.replace("！", "。").replace("？", "。").split("。")) for d in DOCS]
    assert pairs, "the synthetic articles hold overlapping sentences"
    for a, b in pairs:
        a_core, b_core = a[:-1], b[:-1]
        assert any(a_core in s and b_core in s for s in sents), (a, b)  # same article
        assert 0.3 <= _jaccard(a, b) <= 0.8
        assert "１２３４" not in a + b and "摄" not in a + b  # number rows and photo credits are not prose
    used = [t for p in pairs for t in p]
    assert len(used) == len(set(used))  # max_pairs_per_sentence=1
    heldout = heldout_pairs(DOCS, cfg, n=10)
    texts = [t for p in heldout for t in p]
    assert len(texts) == len(set(texts)) and set(map(frozenset, heldout)) <= set(map(frozenset, pairs))


def test_pair_rows_hold_a_pair_and_its_swap_with_whole_word_ids(tmp_path):
    vocab = build_vocab(DOCS * 3, str(tmp_path / "vocab.txt"), 200)
    tok = CharTokenizer(vocab)
    pairs = [("北京天气好", "上海大雨")]
    arr = pair_arrays(tok, pairs, maxlen=8, lexicon=frozenset({"北京", "天气"}))
    assert arr["token_ids"].shape == (1, 2, 19)
    ids, seg, wid = arr["token_ids"][0], arr["segment_ids"][0], arr["word_ids"][0]
    for r, (src, tgt) in enumerate([pairs[0], pairs[0][::-1]]):
        n = len(src)
        assert ids[r, 0] == tok.cls_id and ids[r, n + 1] == tok.sep_id and ids[r, n + len(tgt) + 2] == tok.sep_id
        assert tok.decode(ids[r, 1:n + 1]) == src and tok.decode(ids[r, n + 2:n + len(tgt) + 2]) == tgt
        assert (seg[r, :n + 2] == 0).all() and (seg[r, n + 2:n + len(tgt) + 3] == 1).all()
        assert (seg[r, n + len(tgt) + 3:] == 0).all() and not arr["padding_mask"][0, r, n + len(tgt) + 3:].any()
        assert (wid[r, n + 1:] == -1).all() and wid[r, 0] == -1  # only the source can be corrupted
    # 北京 | 天气 | 好: lexicon words share one id
    assert wid[0, 1:6].tolist() == [0, 0, 1, 1, 2]
    assert word_starts("北京天气好", None) == [0, 1, 2, 3, 4]


def test_retrieval_metrics_match_a_brute_force_ranking():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 8))
    b = a + rng.normal(scale=1.5, size=a.shape)
    m = retrieval_metrics(a, b, group_size=10)
    cos = lambda x, y: x @ y / np.linalg.norm(x) / np.linalg.norm(y)  # noqa: E731
    top1_all = np.mean([max(range(40), key=lambda j: cos(a[i], b[j])) == i for i in range(40)])
    top1_grp = np.mean([max(range(i // 10 * 10, i // 10 * 10 + 10), key=lambda j: cos(a[i], b[j])) == i
                        for i in range(40)])
    assert m["top1_all"] == pytest.approx(top1_all) and m["top1_batch"] == pytest.approx(top1_grp)
    assert 0 < m["top1_all"] < 1 and m["top5_all"] >= m["top1_all"]
    # identical texts are retrieved perfectly by bag-of-chars; a tie never counts as a hit
    va, vb = bag_of_chars(["甲乙", "丙丁", "戊己"], ["甲乙", "丙丁", "戊己"])
    assert retrieval_metrics(va, vb, 3)["top1_all"] == 1.0
    assert retrieval_metrics(np.ones((3, 2)), np.ones((3, 2)), 3)["top1_all"] == 0.0


@pytest.mark.slow
def test_tiny_preset_trains_reports_retrieval_and_generations_and_resumes(tmp_path):
    from experiments.roformer_sim import _documents, main
    from gen_jax.roformer_sim.configs import tiny
    from gen_jax.roformer_sim.generate import encode_texts
    from gen_jax.roformer_sim.training import load_pretrained

    workdir = str(tmp_path / "run")
    small = ["--set", "data.eval_pairs=32", "--set", "eval.every=0", "--set", "eval.num_generate=2"]
    res = main(["--preset", "tiny", "--workdir", workdir, "--set", "train.num_steps=3",
                "--set", "train.checkpoint_every=3", *small])
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    for key in ("retrieval_top1_all", "retrieval_top1_batch", "bag_of_chars_top1_all", "bag_of_chars_top1_batch",
                "chance_top1_all", "chance_top1_batch"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["chance_top1_all"] == pytest.approx(1 / saved["candidates_all"])
    assert saved["steps"] == 3 and saved["start_step"] == 0
    gen = [json.loads(line) for line in open(os.path.join(workdir, "generated.jsonl"), encoding="utf-8")]
    assert len(gen) == 2 and gen == saved["generated"] == res["generated"]
    for g in gen:
        assert g["input"] and g["paired_sentence"] and isinstance(g["similar"], list)
        assert all(s["text"] != g["input"] and -1.0001 <= s["cosine"] <= 1.0001 for s in g["similar"])
        assert [s["cosine"] for s in g["similar"]] == sorted((s["cosine"] for s in g["similar"]), reverse=True)
    assert os.path.exists(os.path.join(workdir, "curves.png")) and os.path.exists(os.path.join(workdir, "vocab.txt"))

    # the export is a loadable HF-style folder holding the trained model: recomputing the held-out retrieval
    # accuracy from it gives the reported number
    model, vocab = load_pretrained(workdir)
    assert model.config.vocab_size == saved["vocab_size"] and open(vocab).read() == open(
        os.path.join(workdir, "vocab.txt")).read()
    cfg = dataclasses.replace(tiny(), data=dataclasses.replace(tiny().data, eval_pairs=32))
    pairs = heldout_pairs(_documents(cfg, cfg.data.eval_split), cfg.data, 32, seed=cfg.train.seed)
    tok = CharTokenizer(vocab)
    enc = lambda texts: encode_texts(model, tok, texts, maxlen=cfg.data.maxlen + 2, batch_size=48)  # noqa: E731
    again = retrieval_metrics(enc([p[0] for p in pairs]), enc([p[1] for p in pairs]), cfg.eval.group_size)
    assert again["top1_all"] == pytest.approx(saved["retrieval_top1_all"], abs=1 / 32)

    # re-running the same workdir with more steps resumes from the checkpoint
    res2 = main(["--preset", "tiny", "--workdir", workdir, "--set", "train.num_steps=5", *small])
    assert res2["start_step"] == 3 and res2["steps"] == 5
