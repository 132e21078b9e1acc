"""Similar-sentence generation: nucleus sampling, the compiled cached decoder vs full recomputation, ranking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gen_jax.roformer import build, unilm_mask
from gen_jax.roformer.tokenizer import CharTokenizer, build_vocab
from gen_jax.roformer_sim.generate import nucleus_sample, sample_candidates, similar_sentences

CORPUS = ["我喜欢北京，今天天气不错。", "今天天气很好", "我不喜欢北京", "明天天气怎么样"]


def test_nucleus_sampling_keeps_the_smallest_set_reaching_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(np.tile(probs, (4000, 1))), jnp.float32)
    sample = jax.jit(nucleus_sample)  # one compile for both calls
    draws = np.asarray(sample(jax.random.key(0), logits, 0.7))
    freq = np.bincount(draws, minlength=4) / draws.size
    assert freq[2] == 0 and freq[3] == 0  # 0.5 + 0.3 >= 0.7: tokens 2, 3 are cut
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    greedy = np.asarray(sample(jax.random.key(1), logits, 1e-6))
    assert (greedy == 0).all()


def test_compiled_greedy_decoder_equals_rerunning_the_full_sequence():
    model = build("tiny", vocab_size=40)
    graphdef, state = nnx.split(model)
    prompt = np.array([2, 11, 17, 23, 3], np.int32)
    max_new, sep = 6, 3
    tokens, lengths = sample_candidates(graphdef, state, jnp.asarray(prompt), jax.random.key(0), n=2,
                                        max_new=max_new, top_p=1e-6, sep_id=sep)
    tokens = np.asarray(tokens)
    assert (tokens[0] == tokens[1]).all()  # greedy: every row the same

    T = len(prompt) + max_new

    @jax.jit
    def next_token(seq, seg, last):  # the original's way: the whole sequence per step under the UniLM mask
        mask = unilm_mask(seg, jnp.arange(T)[None] <= last)
        logits = model.mlm_logits(model(seq, seg, attention_mask_BxTxT=mask).hidden_BxTxD)
        return jnp.argmax(logits[0, last])

    seq = list(prompt)
    for t in range(max_new):
        n = len(seq)
        seg = [0] * len(prompt) + [1] * (T - len(prompt))
        tok = int(next_token(jnp.asarray([seq + [0] * (T - n)]), jnp.asarray([seg]), n - 1))
        assert tok == tokens[0, t], f"step {t}"
        seq.append(tok)
        if tok == sep:
            break
    n_gen = len(seq) - len(prompt)
    assert int(lengths[0]) == n_gen and (tokens[0, n_gen:] == 0).all()


def test_decoding_stops_once_every_row_emitted_sep():
    model = build("tiny", vocab_size=40)
    bias = np.zeros(40, np.float32)
    bias[3] = 100.0  # [SEP] always wins
    model.mlm_bias[...] = jnp.asarray(bias)
    graphdef, state = nnx.split(model)
    tokens, lengths = sample_candidates(graphdef, state, jnp.array([2, 9, 8, 7, 3]), jax.random.key(0), n=2,
                                        max_new=6, top_p=0.95, sep_id=3)  # shapes as above: no new compile
    assert np.asarray(lengths).tolist() == [1, 1]
    assert (np.asarray(tokens)[:, 0] == 3).all() and (np.asarray(tokens)[:, 1:] == 0).all()


@pytest.mark.slow  # two more compiles (sampler at new shapes, sentence encoder)
def test_similar_sentences_are_distinct_ranked_and_never_the_input(tmp_path):
    tok = CharTokenizer(build_vocab(CORPUS, str(tmp_path), 60))
    model = build("tiny", vocab_size=tok.vocab_size)
    text = "今天天气很好"
    out = similar_sentences(model, tok, text, jax.random.key(0), n=16, k=5, maxlen=12, mask_positions=[1])
    assert 1 <= len(out) <= 5
    sents, scores = [s for s, _ in out], [c for _, c in out]
    assert len(set(sents)) == len(sents) and text not in sents and all(sents)
    assert scores == sorted(scores, reverse=True) and all(-1.0 - 1e-5 <= c <= 1.0 + 1e-5 for c in scores)
