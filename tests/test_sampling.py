"""gen_jax.nn.sampling: sort-free nucleus sampling equals the sorted definition (Holtzman et al. 2020), and
inverse-CDF draws follow the renormalized probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gen_jax.nn.sampling import nucleus_cutoff, nucleus_sample, sample_from_probs


def sorted_nucleus_cutoff(logits_row: np.ndarray, top_p: float) -> float:
    """The definition, in float64: sort, keep a token iff the mass of the tokens before it is < top_p."""
    order = np.argsort(-logits_row, kind="stable")
    s = logits_row[order].astype(np.float64)
    p = np.exp(s - s.max())
    p /= p.sum()
    kept = (np.cumsum(p) - p) < top_p
    return float(s[kept].min())


@pytest.fixture(scope="module")
def logits():
    rs = np.random.RandomState(0)
    x = (rs.randn(300, 2000) * rs.uniform(0.1, 6.0, (300, 1))).astype(np.float32)
    x[:, :7] = -np.inf  # banned tokens
    x[:3, 100] = 40.0  # rows where one token holds nearly all the mass
    return x


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.95, 0.99])
def test_cutoff_equals_the_sorted_definition(logits, top_p):
    got = np.asarray(jax.jit(nucleus_cutoff)(logits, top_p))
    want = np.array([sorted_nucleus_cutoff(r, top_p) for r in logits])
    # rows may differ only where the float64 mass above a boundary token is within float32 rounding of top_p
    for i in np.flatnonzero(got != want):
        row = logits[i].astype(np.float64)
        p = np.exp(row - row.max())
        p /= p.sum()
        lo = min(got[i], want[i])
        mass_above = p[row > lo].sum()
        assert abs(mass_above - top_p) < 1e-5, (i, got[i], want[i], mass_above)
    assert (got != want).mean() < 0.01


def test_top_p_one_keeps_every_possible_token_and_tiny_top_p_only_the_best(logits):
    cut = np.asarray(nucleus_cutoff(logits, 1.0))
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # every token with a float32-representable probability is kept (only far tails may underflow), no -inf one
    assert (cut <= np.min(np.where(p > 1e-30, x, np.inf), 1)).all() and np.isfinite(cut).all()
    assert (np.asarray(nucleus_cutoff(logits, 1e-9)) == logits.max(1)).all()


def test_ties_at_the_cutoff_are_kept_together():
    # four equally likely tokens and a fifth unlikely one: any top_p <= 0.75 still keeps all four
    row = jnp.log(jnp.asarray([[0.24, 0.24, 0.24, 0.24, 0.04]], jnp.float32))
    assert float(nucleus_cutoff(row, 0.3)[0]) == pytest.approx(float(row[0, 0]))


def test_draws_follow_the_renormalized_nucleus():
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])  # top_p = 0.8: nucleus {0, 1, 2} (0.4 + 0.25 < 0.8)
    n = 20000
    logits = jnp.asarray(np.log(np.tile(probs, (n, 1))), jnp.float32)
    draws = np.asarray(jax.jit(nucleus_sample)(jax.random.key(0), logits, 0.8))
    counts = np.bincount(draws, minlength=5)
    assert counts[3] == 0 and counts[4] == 0
    expected = probs[:3] / probs[:3].sum() * n
    assert stats.chisquare(counts[:3], expected).pvalue > 1e-3


def test_inverse_cdf_draws_over_many_blocks_match_the_weights_and_skip_zeros():
    rs = np.random.RandomState(1)
    v = 300  # three 128-wide blocks, the last one partial
    w = rs.uniform(0, 1, v) * (rs.uniform(0, 1, v) < 0.3)  # mostly zeros
    w[-1] = 0.0
    n = 60000
    draws = np.asarray(jax.jit(sample_from_probs)(jax.random.key(3), jnp.asarray(np.tile(w, (n, 1)), jnp.float32)))
    counts = np.bincount(draws, minlength=v)
    assert counts[w == 0].sum() == 0
    expected = w / w.sum() * n
    big = expected > 20
    stat = ((counts[big] - expected[big]) ** 2 / expected[big]).sum()
    assert stats.chi2.sf(stat, big.sum() - 1) > 1e-3
