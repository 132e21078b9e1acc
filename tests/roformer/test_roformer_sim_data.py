"""Whole-word corruption statistics, stage-1 rows, STS readers and Spearman evaluation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gen_jax.errors import DataError
from gen_jax.roformer.tokenizer import CharTokenizer, build_vocab
from gen_jax.roformer_sim.corruption import (CLEAN, KEPT, MASKED, RANDOM, corrupt_words, pair_rows,
                                             random_token_ids)
from gen_jax.roformer_sim.sts import evaluate_spearman, format_table, read_cnsd_jsonl, read_sts_tsv


def _synthetic_rows(B=400, T=64, seed=0):
    """Rows [CLS] source words [SEP] target [SEP] with words of 1-3 tokens."""
    r = np.random.RandomState(seed)
    ids = r.randint(10, 100, (B, T)).astype(np.int32)
    wid = np.full((B, T), -1, np.int32)
    for b in range(B):
        t, w = 1, 0
        while t < 40:
            n = r.randint(1, 4)
            wid[b, t:min(t + n, 40)] = w
            t, w = t + n, w + 1
    ids[:, 0], ids[:, 40], ids[:, -1] = 2, 3, 3
    return ids, wid


def test_whole_word_corruption_rates_and_untouched_positions():
    ids, wid = _synthetic_rows()
    pool = random_token_ids(100, [0, 1, 2, 3, 4])
    out, cat = corrupt_words(jax.random.key(0), jnp.asarray(ids), jnp.asarray(wid), mask_id=4, random_ids=pool)
    out, cat = np.asarray(out), np.asarray(cat)
    # one category per word: every token of a word shares its fate
    words = {}
    for b, t in zip(*np.nonzero(wid >= 0)):
        words.setdefault((b, wid[b, t]), set()).add(int(cat[b, t]))
    assert all(len(c) == 1 for c in words.values())
    fates = np.array([c.pop() for c in words.values()])
    n = len(fates)
    for kind, rate in [(MASKED, 0.12), (KEPT, 0.015), (RANDOM, 0.015)]:
        p = np.mean(fates == kind)
        assert abs(p - rate) < 4 * np.sqrt(rate * (1 - rate) / n) + 1e-3, (kind, p, rate, n)
    # [CLS], [SEP] and the target (word id -1) are never touched
    np.testing.assert_array_equal(out[wid < 0], ids[wid < 0])
    assert (cat[wid < 0] == CLEAN).all()
    assert (out[cat == MASKED] == 4).all()
    assert (out[cat == KEPT] == ids[cat == KEPT]).all() and (out[cat == CLEAN] == ids[cat == CLEAN]).all()
    assert np.isin(out[cat == RANDOM], pool).all()


def test_row_prob_corrupts_about_half_the_rows():
    ids, wid = _synthetic_rows(B=600, seed=1)
    _, cat = corrupt_words(jax.random.key(1), jnp.asarray(ids), jnp.asarray(wid), mask_id=4,
                           random_ids=jnp.arange(5, 100), mask_rate=1.0, keep_rate=0.0, random_rate=0.0,
                           row_prob=0.5)
    rows_hit = np.asarray(cat).max(axis=1) > 0
    assert abs(rows_hit.mean() - 0.5) < 0.07


def test_pair_rows_build_both_directions(tmp_path):
    tok = CharTokenizer(build_vocab(["我喜欢北京", "今天天气很好"], str(tmp_path), 100))
    rows = pair_rows(tok, [(["我", "喜欢", "北京"], ["今天", "天气", "很好"])], maxlen=8)
    assert rows["token_ids"].shape == (2, 19)
    a = tok.encode("我喜欢北京", "今天天气很好")[0]
    b = tok.encode("今天天气很好", "我喜欢北京")[0]
    assert rows["token_ids"][0, :len(a)].tolist() == a and rows["token_ids"][1, :len(b)].tolist() == b
    assert rows["segment_ids"][0, :len(a)].tolist() == [0] * 7 + [1] * 7
    assert rows["word_ids"][0, :8].tolist() == [-1, 0, 1, 1, 2, 2, -1, -1]
    assert rows["word_ids"][1, :9].tolist() == [-1, 0, 0, 1, 1, 2, 2, -1, -1]
    assert rows["padding_mask"][0].sum() == len(a)


def test_sts_tsv_reader_binarises_stsb_only_for_training(tmp_path):
    p = tmp_path / "STS-B.test.data"
    p.write_text("text1\ttext2\tlabel\n一个人在弹吉他\t一个男人在弹吉他\t4.2\n猫在睡觉\t狗在跑\t0.5\n\n", encoding="utf-8")
    assert read_sts_tsv(str(p), "STS-B") == [("一个人在弹吉他", "一个男人在弹吉他", 4.2), ("猫在睡觉", "狗在跑", 0.5)]
    assert [r[2] for r in read_sts_tsv(str(p), "STS-B", binary=True)] == [1.0, 0.0]
    q = tmp_path / "lcqmc.tsv"
    q.write_text("a\tb\t1\nc\td\tx\n", encoding="utf-8")
    with pytest.raises(DataError, match="lcqmc.tsv:2"):
        read_sts_tsv(str(q))


def test_cnsd_reader_maps_labels_and_skips_unlabelled(tmp_path):
    p = tmp_path / "cnsd.jsonl"
    rows = [{"sentence1": "a", "sentence2": "b", "gold_label": "entailment"},
            {"sentence1": "c", "sentence2": "d", "gold_label": "-"},
            {"sentence1": "e", "sentence2": "f", "gold_label": "contradiction"},
            {"sentence1": "g", "sentence2": "h", "gold_label": "neutral"}]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert read_cnsd_jsonl(str(p)) == [("a", "b", 1), ("e", "f", 0), ("g", "h", 2)]


def test_spearman_of_cosines_against_a_brute_force_rank_correlation():
    r = np.random.RandomState(0)
    vecs = {f"s{i}": r.randn(4) for i in range(20)}
    pairs = [(f"s{i}", f"s{i + 10}", float(r.randint(0, 6))) for i in range(10)]
    got = evaluate_spearman(lambda texts: np.stack([vecs[t] for t in texts]), pairs, batch_size=3)

    def ranks(x):  # average ranks for ties
        x = np.asarray(x)
        return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])
    cos = [vecs[a] @ vecs[b] / np.linalg.norm(vecs[a]) / np.linalg.norm(vecs[b]) for a, b, _ in pairs]
    expected = np.corrcoef(ranks(cos), ranks([p[2] for p in pairs]))[0, 1]
    assert got == pytest.approx(expected, abs=1e-9)
    table = format_table({"ours": {"LCQMC": got, "STS-B": 0.5}})
    assert table.splitlines()[0] == "| model | ATEC | BQ | LCQMC | PAWSX | STS-B |"
    assert table.splitlines()[2] == f"| ours | - | - | {100 * got:.2f} | - | 50.00 |"
