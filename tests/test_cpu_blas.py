"""gen_jax.nn.cpu_blas: float32 products and convolution kernel gradients as custom calls into MKL's sgemm.
Every result is checked against float64 NumPy or XLA's own product/convolution, gradients included (to third
order, vmapped, broadcast). The test session has 8 fake devices, where the custom calls are off by default
(no sharding rule), so these tests turn them on with GEN_JAX_CPU_BLAS=force; a subprocess checks the default
on a single device."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gen_jax.nn import conv_general_dilated, cpu_blas, flat_dot_general
from gen_jax.nn.conv import blas_kernel_grad_pays, shifted_kernel_grad_pays

if not cpu_blas._init()["ok"]:
    pytest.skip(f"no BLAS custom calls here: {cpu_blas._init()['why']}", allow_module_level=True)

_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def forced(monkeypatch):
    monkeypatch.setenv(cpu_blas.ENV_SWITCH, "force")
    assert cpu_blas.status().startswith("on")


def _custom_call_targets(f, *args):
    text = jax.jit(f).lower(*args).as_text()
    targets = (cpu_blas._GEMM, cpu_blas._CONV_KGRAD, cpu_blas._CONV_FWD, cpu_blas._DIRECT_CONV, cpu_blas._SOFTMAX, cpu_blas._SOFTMAX_GRAD, cpu_blas._LAYER_NORM,
               cpu_blas._LAYER_NORM_GRAD, cpu_blas._GROUP_NORM, cpu_blas._GROUP_NORM_GRAD, cpu_blas._FLIP_TRANSPOSE, cpu_blas._ADAM,
               cpu_blas._ADAM_EMA)
    return {t for t in targets if t in text}


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 3), (300, 129, 517), (64, 0, 8), (64, 2048, 16)])
def test_matmul_equals_float64_numpy_for_every_transpose(m, k, n, trans_a, trans_b):
    a = _rand(0, (k, m) if trans_a else (m, k))
    b = _rand(1, (n, k) if trans_b else (k, n))
    got = jax.jit(lambda a, b: cpu_blas.matmul(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * max(1.0, np.sqrt(k)))
    assert _custom_call_targets(lambda a, b: cpu_blas.matmul(a, b, trans_a=trans_a, trans_b=trans_b), a, b) == {
        cpu_blas._GEMM}


def test_batch_axes_broadcast_like_jnp_matmul_and_gradients_sum_over_them():
    a = _rand(2, (2, 1, 5, 7))
    b = _rand(3, (3, 7, 4))  # rank 3: a missing leading axis, broadcast against a's 2 and a's 1 against 3

    def loss(mm, a, b):
        return jnp.sum(jnp.cos(mm(a, b)))

    np.testing.assert_allclose(cpu_blas.matmul(a, b), jnp.matmul(a, b), rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda a, b: loss(cpu_blas.matmul, a, b), (0, 1))(a, b)
    want = jax.grad(lambda a, b: loss(jnp.matmul, a, b), (0, 1))(a, b)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_gradients_to_third_order_equal_xla():
    a, b = _rand(4, (6, 5)), _rand(5, (4, 5)) * 0.3

    def f(mm):
        def loss(a, b):
            return jnp.sum(jnp.sin(mm(a, b)))

        def g2(a):  # d/da |d loss / db|^2
            return jnp.sum(jax.grad(loss, 1)(a, b) ** 2)

        def g3(a):
            return jnp.sum(jax.grad(g2)(a) ** 2)
        return jax.grad(loss, (0, 1))(a, b), jax.grad(g2)(a), jax.grad(g3)(a)

    got = f(lambda a, b: cpu_blas.matmul(a, b, trans_b=True))
    want = f(lambda a, b: a @ b.T)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.abs(w).max()))


def test_vmap_over_either_operand_and_over_the_gradient():
    a, b = _rand(6, (3, 5, 7)), _rand(7, (2, 7, 4))
    np.testing.assert_allclose(jax.vmap(lambda x: cpu_blas.matmul(x, b[0]))(a), a @ b[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(lambda y: cpu_blas.matmul(a, y))(b),
                               jnp.stack([a @ b[0], a @ b[1]]), rtol=1e-5, atol=1e-5)
    per_example = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.tanh(cpu_blas.matmul(x, w)))), (None, 0))(b[0], a)
    want = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))), (None, 0))(b[0], a)
    np.testing.assert_allclose(per_example, want, rtol=1e-5, atol=1e-5)


def test_bad_operands_are_refused_with_the_shapes_named():
    with pytest.raises(ValueError, match=r"contracted sizes differ \(5 vs 6\)"):
        cpu_blas.matmul(jnp.ones((3, 5)), jnp.ones((6, 2)))
    with pytest.raises(ValueError, match="rank >= 2"):
        cpu_blas.matmul(jnp.ones((3,)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="odd kernel size"):
        cpu_blas.conv_kernel_grad(jnp.ones((1, 4, 4, 2)), jnp.ones((1, 4, 4, 3)), 2)


def test_other_dtypes_and_the_off_switch_keep_xla_products(monkeypatch):
    a16, b16 = jnp.ones((4, 3), jnp.bfloat16), jnp.ones((3, 2), jnp.bfloat16)
    assert not cpu_blas.enabled(a16, b16) and not _custom_call_targets(cpu_blas.matmul, a16, b16)
    np.testing.assert_array_equal(cpu_blas.matmul(a16, b16), jnp.full((4, 2), 3, jnp.bfloat16))
    a, b = _rand(8, (4, 3)), _rand(9, (3, 2))
    monkeypatch.setenv(cpu_blas.ENV_SWITCH, "0")
    assert cpu_blas.status().startswith("off") and not _custom_call_targets(cpu_blas.matmul, a, b)
    np.testing.assert_allclose(cpu_blas.matmul(a, b), a @ b, rtol=1e-6)
    monkeypatch.setenv(cpu_blas.ENV_SWITCH, "sometimes")
    with pytest.raises(ValueError, match="use 0 .off., auto"):
        cpu_blas.enabled(a, b)


@pytest.mark.parametrize("shape,k", [((2, 5, 7, 3), 3), ((3, 9, 6, 16), 5), ((1, 1, 1, 2), 3), ((4, 8, 8, 64), 3),
                                     ((8, 16, 16, 32), 3)])  # the last: several row tiles and workers
def test_conv_kernel_grad_equals_xla_backward_filter(shape, k):
    x = _rand(10, shape)
    out = 5 if shape[3] < 64 else 64
    g = _rand(11, shape[:3] + (out,))

    def conv(w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)
    want = jax.vjp(conv, jnp.zeros((k, k, shape[3], out)))[1](g)[0]
    got = jax.jit(cpu_blas.conv_kernel_grad, static_argnums=2)(x, g, k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert _custom_call_targets(lambda x, g: cpu_blas.conv_kernel_grad(x, g, k), x, g) == {cpu_blas._CONV_KGRAD}


def test_dense_layers_and_convolutions_route_through_it_with_xla_gradients():
    """flat_dot_general and conv_general_dilated (the layers of every model) use the custom calls on the
    forced path, with the values and gradients of lax's product and convolution."""
    x, w = _rand(12, (2, 9, 16)), _rand(13, (16, 8))
    dims = (((2,), (0,)), ((), ()))
    assert _custom_call_targets(lambda x, w: flat_dot_general(x, w, dims), x, w) == {cpu_blas._GEMM}
    got = jax.grad(lambda x, w: jnp.sum(jnp.tanh(flat_dot_general(x, w, dims))), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.tanh(lax.dot_general(x, w, dims))), (0, 1))(x, w)
    for g, v in zip(got, want):
        np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5)

    # 32 channels at 14x14: narrower than the shifted products need, wide enough for the MKL kernel gradient
    xi, wi = _rand(14, (2, 14, 14, 32)), _rand(15, (3, 3, 32, 32)) * 0.1
    assert blas_kernel_grad_pays(wi.shape, (14, 14)) and not shifted_kernel_grad_pays(wi.shape, (14, 14))

    def conv_loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)))

    def grad_hlo(x, w):
        return jax.jit(jax.grad(lambda x, w: conv_loss(conv_general_dilated, x, w), (0, 1))).lower(x, w).as_text()
    assert cpu_blas._CONV_KGRAD in grad_hlo(xi, wi)
    assert cpu_blas._CONV_KGRAD not in grad_hlo(xi[:, :7, :7], wi)  # 7x7: XLA's backward filter is faster
    assert cpu_blas._CONV_KGRAD not in grad_hlo(xi[..., :16], wi[:, :, :16])  # 16 channels: likewise
    got = jax.grad(lambda x, w: conv_loss(conv_general_dilated, x, w), (0, 1))(xi, wi)
    want = jax.grad(lambda x, w: conv_loss(lax.conv_general_dilated, x, w), (0, 1))(xi, wi)
    for g, v in zip(got, want):
        np.testing.assert_allclose(g, v, rtol=1e-4, atol=1e-5 * float(jnp.abs(v).max()))


def test_by_default_on_one_cpu_device_and_off_with_several():
    """The default (auto) uses the custom calls in a single-device process and not under 8 devices, where a
    sharded program would gather every operand."""
    code = ("import jax, jax.numpy as jnp; from gen_jax.nn import cpu_blas, flat_dot; "
            "x = jnp.ones((4, 3)); print(cpu_blas.status()); "
            "print(cpu_blas._GEMM in jax.jit(flat_dot).lower(x, jnp.ones((3, 2))).as_text())")
    outputs = []
    for flags in ("", "--xla_force_host_platform_device_count=8"):
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        env.pop(cpu_blas.ENV_SWITCH, None)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout.split("\n"))
    (status_one, used_one, _), (status_eight, used_eight, _) = outputs
    assert status_one.startswith("on: sgemm from") and used_one == "True"
    assert status_eight.startswith("off: 8 devices") and used_eight == "False"


@pytest.mark.parametrize("causal", [True, False])
def test_flash_chunk_attention_on_blas_products_equals_the_dense_reference_with_gradients(causal):
    from gen_jax.flash import dense_reference, mixed_chunk_attention
    ks = jax.random.split(jax.random.key(16), 5)
    args = [jax.random.normal(k, (2, 11, 6)) for k in ks[:4]] + [jax.random.normal(ks[4], (2, 11, 5))]
    mask = jnp.arange(11)[None, :] < jnp.array([[11], [7]])
    kw = dict(chunk_size=4, causal=causal, mask=mask, normalizer="relu2_n")
    hlo = jax.jit(lambda *a: mixed_chunk_attention(*a, **kw)).lower(*args).as_text()
    assert cpu_blas._GEMM in hlo

    def loss(f, *a):
        return jnp.sum(jnp.sin(f(*a, **kw)))
    np.testing.assert_allclose(mixed_chunk_attention(*args, **kw), dense_reference(*args, **kw), atol=2e-5, rtol=1e-5)
    got = jax.grad(lambda *a: loss(mixed_chunk_attention, *a), tuple(range(5)))(*args)
    want = jax.grad(lambda *a: loss(dense_reference, *a), tuple(range(5)))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4)


def test_roformer_on_blas_products_has_the_hidden_states_and_gradients_of_xla(monkeypatch):
    from flax import nnx

    from gen_jax.roformer import build
    graphdef, params = nnx.split(build("tiny", seed=0), nnx.Param)
    ids = jax.random.randint(jax.random.key(17), (2, 9), 5, 128)

    def loss(p):
        model = nnx.merge(graphdef, p)
        return jnp.mean(model(ids, jnp.zeros_like(ids), padding_mask_BxT=ids > 40).hidden_BxTxD ** 2)

    def run():
        return jax.jit(jax.value_and_grad(loss))(params), jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
    (blas_loss, blas_grads), blas_hlo = run()
    monkeypatch.setenv(cpu_blas.ENV_SWITCH, "0")
    (xla_loss, xla_grads), xla_hlo = run()
    for target in (cpu_blas._GEMM, cpu_blas._SOFTMAX, cpu_blas._SOFTMAX_GRAD):
        assert target in blas_hlo and target not in xla_hlo
    np.testing.assert_allclose(blas_loss, xla_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(blas_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_second_order_through_the_convolution_kernel_gradient_equals_lax():
    """A gradient penalty on the kernel gradient (grad of grad) differentiates the custom call's kernel
    gradient: its VJP is XLA's, so the result is lax's."""
    x, w = _rand(18, (1, 14, 14, 32)), _rand(19, (3, 3, 32, 32)) * 0.1

    def penalty(conv, x):
        grad_w = jax.grad(lambda w: jnp.sum(jnp.tanh(conv(x, w, (1, 1), "SAME", dimension_numbers=_NHWC))))(w)
        return jnp.sum(grad_w ** 2)
    assert cpu_blas._CONV_KGRAD in jax.jit(jax.grad(lambda x: penalty(conv_general_dilated, x))).lower(x).as_text()
    got = jax.grad(lambda x: penalty(conv_general_dilated, x))(x)
    want = jax.grad(lambda x: penalty(lax.conv_general_dilated, x))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def _softmax_float64(scores, scale, mask):
    """The attention softmax in float64 numpy: masked logits become -1e30 (a fully masked row is uniform)."""
    z = np.asarray(scores, np.float64) * scale
    if mask is not None:
        z = np.where(np.asarray(mask)[:, None], z, -1e30)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("S", [64, 9])  # the 16-float vector path and the scalar one
@pytest.mark.parametrize("mask_shape", [None, (2, 5, "S"), (2, 1, "S"), (1, 5, "S")])
def test_attention_softmax_equals_float64_numpy_with_every_mask_broadcast(S, mask_shape):
    scores = _rand(30, (2, 3, 5, S)) * 40.0  # wide logits: many exp arguments far below -87
    mask = None
    if mask_shape is not None:
        mask = jax.random.bernoulli(jax.random.key(31), 0.6, tuple(S if d == "S" else d for d in mask_shape))
        mask = mask.at[0, 0].set(False)  # one fully masked row (or head-broadcast block of rows)
    probs = cpu_blas.attention_softmax(scores, 0.125, mask)
    assert cpu_blas._SOFTMAX in _custom_call_targets(lambda s: cpu_blas.attention_softmax(s, 0.125, mask), scores)
    np.testing.assert_allclose(probs, _softmax_float64(scores, 0.125, mask), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=2e-6)
    if mask is not None:
        assert np.all(np.asarray(probs)[np.broadcast_to(~np.asarray(mask)[:, None], probs.shape)
                                        & ~np.all(~np.asarray(mask), -1, keepdims=True)[:, None]] == 0.0)


@pytest.mark.parametrize("S", [48, 7])
def test_attention_softmax_gradients_to_second_order_equal_the_xla_formula(S):
    """The fused gradient (and its own VJP) agree with XLA's autodiff of the same formula, including zero
    gradient for masked logits and for rows masked entirely."""
    scores, w = _rand(32, (2, 2, 4, S)) * 3.0, _rand(33, (2, 2, 4, S))
    mask = jax.random.bernoulli(jax.random.key(34), 0.7, (2, 4, S)).at[1, 2].set(False)

    def loss(softmax, s):
        return jnp.sum(jnp.sin(softmax(s)) * w)
    fused = lambda s: cpu_blas.attention_softmax(s, 0.3, mask)  # noqa: E731
    xla = lambda s: cpu_blas._xla_attention_softmax(s, mask, 0.3)  # noqa: E731
    got, want = jax.grad(lambda s: loss(fused, s))(scores), jax.grad(lambda s: loss(xla, s))(scores)
    assert cpu_blas._SOFTMAX_GRAD in _custom_call_targets(jax.grad(lambda s: loss(fused, s)), scores)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(got)[np.broadcast_to(~np.asarray(mask)[:, None], got.shape)] == 0.0)
    second = lambda f: jax.grad(lambda s: jnp.sum(jax.grad(lambda s: loss(f, s))(s) ** 2))(scores)  # noqa: E731
    np.testing.assert_allclose(second(fused), second(xla), rtol=1e-4, atol=1e-6)


def test_attention_softmax_vmaps_propagates_nan_and_refuses_bad_masks():
    scores = _rand(35, (3, 1, 2, 4, 16))
    got = jax.vmap(lambda s: cpu_blas.attention_softmax(s, 1.0))(scores)
    np.testing.assert_allclose(got, jax.nn.softmax(scores, -1), rtol=2e-6, atol=1e-7)
    poisoned = cpu_blas.attention_softmax(scores[0].at[0, 0, 1, 3].set(jnp.nan), 1.0)
    assert np.all(np.isnan(poisoned[0, 0, 1])) and not np.any(np.isnan(poisoned[0, 0, 0]))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 4, 15\)"):
        cpu_blas.attention_softmax(scores[0], 1.0, jnp.ones((1, 4, 15), bool))
    with pytest.raises(ValueError, match=r"scores \[B, N, T, S\]"):
        cpu_blas.attention_softmax(scores[0, 0], 1.0)


@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 48)])
def test_layer_norm_equals_float64_numpy_and_its_gradients_equal_xla_to_second_order(shape):
    x = _rand(40, shape) * 3.0 + 5.0  # an offset, where a one-pass variance would lose digits
    scale, bias, w = _rand(41, shape[-1:]), _rand(42, shape[-1:]), _rand(43, shape)
    x64 = np.asarray(x, np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    want = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(scale) + np.asarray(bias)
    fused = lambda x, s, b: cpu_blas.layer_norm(x, s, b, 1e-6)  # noqa: E731
    xla = lambda x, s, b: cpu_blas._xla_layer_norm(x, s, b, 1e-6)  # noqa: E731
    assert cpu_blas._LAYER_NORM in _custom_call_targets(fused, x, scale, bias)
    np.testing.assert_allclose(fused(x, scale, bias), want, rtol=1e-5, atol=1e-5)

    def loss(f, x, s, b):
        return jnp.sum(jnp.sin(f(x, s, b)) * w)
    got = jax.grad(lambda *a: loss(fused, *a), (0, 1, 2))(x, scale, bias)
    ref = jax.grad(lambda *a: loss(xla, *a), (0, 1, 2))(x, scale, bias)
    assert cpu_blas._LAYER_NORM_GRAD in _custom_call_targets(jax.grad(lambda *a: loss(fused, *a)), x, scale, bias)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))

    def second(f):
        return jax.grad(lambda x: jnp.sum(jax.grad(lambda x, s: loss(f, x, s, bias), (0, 1))(x, scale)[1] ** 2))(x)
    np.testing.assert_allclose(second(fused), second(xla), rtol=1e-3, atol=1e-4 * float(jnp.abs(second(xla)).max()))


def test_layer_norm_keeps_widths_off_the_vector_grid_on_xla_and_refuses_mismatched_parameters():
    x = _rand(44, (4, 10))
    assert cpu_blas._LAYER_NORM not in jax.jit(lambda x: cpu_blas.layer_norm(
        x, jnp.ones(10), jnp.zeros(10), 1e-5)).lower(x).as_text()
    with pytest.raises(ValueError, match=r"scale \(9,\) and bias \(10,\) must be \[10\]"):
        cpu_blas.layer_norm(x, jnp.ones(9), jnp.zeros(10), 1e-5)


def _group_norm_float64(x, scale, bias, groups, eps, silu):
    x64 = np.asarray(x, np.float64)
    xg = x64.reshape(x64.shape[0], -1, groups, x64.shape[-1] // groups)
    centred = xg - xg.mean(axis=(1, 3), keepdims=True)
    z = (centred / np.sqrt((centred ** 2).mean(axis=(1, 3), keepdims=True) + eps)).reshape(x64.shape)
    z = z * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    return z / (1.0 + np.exp(-z)) if silu else z


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape,groups", [((3, 7, 5, 32), 8), ((2, 6, 16), 1), ((2, 4, 4, 48), 48)])
def test_group_norm_equals_float64_numpy_and_its_gradients_equal_xla_to_second_order(shape, groups, silu):
    x = _rand(50, shape) * 2.0 + 3.0
    scale, bias, w = _rand(51, shape[-1:]), _rand(52, shape[-1:]), _rand(53, shape)
    fused = lambda x, s, b: cpu_blas.group_norm(x, s, b, groups, 1e-6, silu=silu)  # noqa: E731
    xla = lambda x, s, b: cpu_blas._xla_group_norm(x, s, b, groups, 1e-6, silu)  # noqa: E731
    assert cpu_blas._GROUP_NORM in _custom_call_targets(fused, x, scale, bias)
    np.testing.assert_allclose(fused(x, scale, bias), _group_norm_float64(x, scale, bias, groups, 1e-6, silu),
                               rtol=1e-5, atol=2e-5)

    def loss(f, x, s, b):
        return jnp.sum(jnp.sin(f(x, s, b)) * w)
    got = jax.grad(lambda *a: loss(fused, *a), (0, 1, 2))(x, scale, bias)
    ref = jax.grad(lambda *a: loss(xla, *a), (0, 1, 2))(x, scale, bias)
    assert cpu_blas._GROUP_NORM_GRAD in _custom_call_targets(jax.grad(lambda *a: loss(fused, *a)), x, scale, bias)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))

    def second(f):
        return jax.grad(lambda x: jnp.sum(jax.grad(lambda x, s: loss(f, x, s, bias), (0, 1))(x, scale)[1] ** 2))(x)
    want = second(xla)
    np.testing.assert_allclose(second(fused), want, rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()))


def test_group_norm_equals_flax_and_refuses_bad_groups_and_parameters():
    from flax import nnx
    x = _rand(54, (2, 5, 5, 32))
    norm = nnx.GroupNorm(32, num_groups=4, epsilon=1e-6, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = _rand(55, (32,)), _rand(56, (32,))
    np.testing.assert_allclose(cpu_blas.group_norm(x, norm.scale[...], norm.bias[...], 4, 1e-6), norm(x),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="32 channels do not split into 5 groups"):
        cpu_blas.group_norm(x, norm.scale[...], norm.bias[...], 5, 1e-6)
    with pytest.raises(ValueError, match=r"scale \(16,\)"):
        cpu_blas.group_norm(x, jnp.ones(16), norm.bias[...], 4, 1e-6)
    x20 = _rand(57, (2, 3, 20))  # channels off the 16-float grid: XLA's formula
    assert cpu_blas._GROUP_NORM not in jax.jit(lambda x: cpu_blas.group_norm(
        x, jnp.ones(20), jnp.zeros(20), 4, 1e-6)).lower(x20).as_text()


def test_unet_on_fused_group_norms_has_the_outputs_and_gradients_of_xla(monkeypatch):
    """A U-Net with 16-channel layers (fused GroupNorm+SiLU) and 8-channel ones (flax's GroupNorm) equals
    the all-XLA U-Net, values and parameter gradients."""
    from flax import nnx

    from gen_jax.ddpm import UNet
    unet = UNet(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
                num_groups=4, dropout=0.0, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(unet, nnx.Param)
    params = jax.tree.map(lambda p: p + 0.05 * _rand(58, p.shape), params)  # no zero-initialized output layer
    x, t = _rand(59, (2, 8, 8, 1)), jnp.array([3, 700])

    def loss(p):
        return jnp.mean(jnp.tanh(nnx.merge(graphdef, p)(x, t, deterministic=True)) ** 2)

    def run():
        step = jax.jit(jax.value_and_grad(loss))
        return step(params), step.lower(params).as_text()
    (fused_loss, fused_grads), fused_hlo = run()
    monkeypatch.setenv(cpu_blas.ENV_SWITCH, "0")
    (xla_loss, xla_grads), xla_hlo = run()
    assert cpu_blas._GROUP_NORM in fused_hlo and cpu_blas._GROUP_NORM_GRAD in fused_hlo
    assert cpu_blas._GROUP_NORM not in xla_hlo
    np.testing.assert_allclose(fused_loss, xla_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5 * max(float(jnp.abs(w).max()), 1e-3))



@pytest.mark.parametrize("x_shape,w_shape", [((2, 9, 7, 24), (3, 3, 24, 40)), ((3, 5, 5, 8), (5, 5, 8, 6)),
                                             ((1, 4, 6, 16), (1, 1, 16, 16)), ((2, 3, 3, 4), (3, 3, 4, 2)),
                                             ((2, 11, 13, 16), (3, 3, 16, 32)), ((2, 6, 5, 1), (5, 5, 1, 48)),
                                             ((3, 9, 10, 3), (3, 3, 3, 64))])
def test_conv2d_same_equals_lax_with_gradients_to_second_order(x_shape, w_shape):
    """Both kernels: im2col (wide or odd shapes) and direct (<= 16 inputs, 16-64 outputs; rows of 13, 5 and
    10 pixels end inside a block of 8, and the input gradient of a 16 -> 32 layer is a 32 -> 16 im2col one)."""
    x, w, c = _rand(60, x_shape), _rand(61, w_shape) * 0.2, _rand(62, x_shape[:3] + w_shape[3:])

    def lax_conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC, precision="highest")
    direct = cpu_blas.direct_conv_fits(w_shape[2], w_shape[3])
    assert (cpu_blas._DIRECT_CONV if direct else cpu_blas._CONV_FWD) in _custom_call_targets(cpu_blas.conv2d_same, x, w)
    np.testing.assert_allclose(cpu_blas.conv2d_same(x, w), lax_conv(x, w), rtol=1e-5, atol=1e-5)

    def loss(conv, x, w):
        return jnp.sum(jnp.tanh(conv(x, w)) * c)
    got = jax.grad(lambda x, w: loss(cpu_blas.conv2d_same, x, w), (0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(lax_conv, x, w), (0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))

    def penalty(conv):  # a gradient penalty: the input gradient differentiated again
        return jax.grad(lambda w: jnp.sum(jax.grad(lambda x: loss(conv, x, w))(x) ** 2))(w)
    want2 = penalty(lax_conv)
    np.testing.assert_allclose(penalty(cpu_blas.conv2d_same), want2, rtol=1e-3, atol=1e-4 * float(jnp.abs(want2).max()))


def test_wide_and_narrow_convolutions_route_through_the_custom_calls():
    from gen_jax.nn.conv import blas_conv_pays
    assert blas_conv_pays((3, 3, 16, 16)) and blas_conv_pays((3, 3, 1, 32)) and not blas_conv_pays((3, 3, 32, 16))
    wide_x, wide_w = _rand(63, (1, 4, 4, 128)), _rand(64, (3, 3, 128, 128)) * 0.05
    narrow_x, narrow_w = _rand(65, (1, 4, 4, 32)), _rand(66, (3, 3, 32, 32)) * 0.05
    assert blas_conv_pays(wide_w.shape) and not blas_conv_pays(narrow_w.shape)

    def loss(x, w):
        return jnp.sum(conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC) ** 2)
    wide_hlo = jax.jit(jax.grad(loss, (0, 1))).lower(wide_x, wide_w).as_text()
    assert wide_hlo.count(cpu_blas._CONV_FWD) >= 2  # forward and input gradient
    assert cpu_blas._CONV_FWD not in jax.jit(jax.grad(loss, (0, 1))).lower(narrow_x, narrow_w).as_text()
    got = jax.grad(loss, (0, 1))(wide_x, wide_w)
    want = jax.grad(lambda x, w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC,
                                                                  precision="highest") ** 2), (0, 1))(wide_x, wide_w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("shape", [(3, 3, 256, 256), (5, 5, 7, 33), (1, 1, 3, 2), (3, 3, 40, 0)])
def test_flipped_transposed_kernel_is_the_flip_and_swap_and_its_own_transpose(shape):
    w, ct = _rand(70, shape), _rand(71, shape[:2] + (shape[3], shape[2]))
    assert _custom_call_targets(cpu_blas.flipped_transposed_kernel, w) == {cpu_blas._FLIP_TRANSPOSE}
    np.testing.assert_array_equal(cpu_blas.flipped_transposed_kernel(w), np.asarray(w)[::-1, ::-1].transpose(0, 1, 3, 2))
    (got,) = jax.vjp(cpu_blas.flipped_transposed_kernel, w)[1](ct)
    np.testing.assert_array_equal(got, np.asarray(ct)[::-1, ::-1].transpose(0, 1, 3, 2))
    with pytest.raises(ValueError, match="HWIO"):
        cpu_blas.flipped_transposed_kernel(w[0])


@pytest.mark.parametrize("shape,strides,padding", [((2, 5, 7, 12), (1, 1), "SAME"), ((1, 3, 3, 5), (1, 1), "VALID")])
def test_one_by_one_convolutions_are_one_blas_product_with_the_gradients_of_lax(shape, strides, padding):
    x, w, c = _rand(72, shape), _rand(73, (1, 1, shape[3], 9)), _rand(74, shape[:3] + (9,))

    def loss(conv, x, w):
        return jnp.sum(jnp.tanh(conv(x, w, strides, padding, dimension_numbers=_NHWC)) * c)
    targets = _custom_call_targets(jax.grad(lambda x, w: loss(conv_general_dilated, x, w), (0, 1)), x, w)
    assert targets == {cpu_blas._GEMM}
    got = jax.grad(lambda x, w: loss(conv_general_dilated, x, w), (0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(functools.partial(lax.conv_general_dilated, precision="highest"), x, w),
                    (0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * float(jnp.abs(r).max()))


def _mlp_loss(params, batch, rng):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2) * batch["scale"], {}


@pytest.mark.parametrize("opt_kw", [{"grad_clip_norm": 0.05}, {"grad_clip_norm": 100.0}, {},
                                    {"warmup_steps": 3, "grad_clip_norm": 1.0}])
@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_fused_adam_step_is_optax_adam_with_clipping_schedule_ema_and_the_non_finite_skip(opt_kw, ema_decay):
    """make_update_fn runs make_optimizer's Adam as one `adam_step` call per tensor; the same optimizer stripped
    of its tag runs through optax. Six steps (the fourth with a NaN loss, which must change nothing but the step
    counter) end in the same state to float32 rounding, and in the same counters exactly."""
    import optax

    from gen_jax.train.state import TrainState
    from gen_jax.train.step import make_optimizer, make_update_fn
    rng = np.random.default_rng(0)
    params = {"w1": _rand(75, (5, 7)), "b1": jnp.zeros(7), "w2": _rand(76, (7, 3))}
    opt = make_optimizer(1e-2, **opt_kw)
    plain = optax.GradientTransformation(opt.init, opt.update)
    fused_fn = jax.jit(make_update_fn(_mlp_loss, opt, ema_decay=ema_decay))
    optax_fn = jax.jit(make_update_fn(_mlp_loss, plain, ema_decay=ema_decay))
    fused = optax_ = TrainState.create(params, opt, jax.random.key(0), use_ema=ema_decay is not None)
    batch = {"x": _rand(77, (4, 5)), "y": _rand(78, (4, 3)), "scale": jnp.float32(1.0)}
    want_targets = {cpu_blas._ADAM_EMA if ema_decay else cpu_blas._ADAM}
    assert _custom_call_targets(fused_fn, fused, batch) & {cpu_blas._ADAM, cpu_blas._ADAM_EMA} == want_targets
    assert not _custom_call_targets(optax_fn, fused, batch) & {cpu_blas._ADAM, cpu_blas._ADAM_EMA}
    finites = []
    for i in range(6):
        batch = {"x": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                 "y": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "scale": jnp.float32(np.nan if i == 3 else 1)}
        before = fused
        fused, m_fused = fused_fn(fused, batch)
        optax_, m_optax = optax_fn(optax_, batch)
        finites.append(float(m_fused["finite"]))
        assert float(m_fused["finite"]) == float(m_optax["finite"])
        if i == 3:
            for a, b in zip(jax.tree.leaves(fused.replace(step=before.step, rng=None)),
                            jax.tree.leaves(before.replace(rng=None))):
                np.testing.assert_array_equal(a, b)
    assert finites == [1, 1, 1, 0, 1, 1]
    for a, b in zip(jax.tree.leaves(fused.replace(rng=None)), jax.tree.leaves(optax_.replace(rng=None))):
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(a, b)
        elif jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(fused.params["w1"] - params["w1"]).max()) > 1e-3  # it did train


def test_adam_step_refuses_mismatched_operands():
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="one shape"):
        cpu_blas.adam_step(x, jnp.ones((4, 3)), x, x, jnp.ones(7), b1=0.9, b2=0.999, eps=1e-8)
    with pytest.raises(ValueError, match="ema_decay"):
        cpu_blas.adam_step(x, x, x, x, jnp.ones(7), b1=0.9, b2=0.999, eps=1e-8, ema=x)
