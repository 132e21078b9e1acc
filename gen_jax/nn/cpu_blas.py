"""float32 matrix products on CPU through a CBLAS sgemm (Intel MKL), and fused attention softmax and LayerNorm
kernels, as XLA FFI custom calls.

Why: on the x86 CPUs we measured, MKL's single-precision GEMM is 10-30% faster than the kernels XLA:CPU
emits for the same dense-layer products, and up to 4x faster for the kernel gradient of 3x3 convolutions
with 32 or more channels (benchmarks/RESULTS.md, "MKL products"). PyTorch's CPU build calls MKL; with this module so do our dense
layers (`gen_jax.nn.dense`) and convolution kernel gradients (`gen_jax.nn.conv`) on CPU. XLA:CPU also makes
several passes over memory for a masked softmax or a LayerNorm and their gradients; `attention_softmax` and
`layer_norm` make one each way (row by row in L1, vectorized with GCC vector extensions), which took 4.6% and
3-4% off RoFormer's encoder step (benchmarks/RESULTS.md, "Fused softmax and LayerNorm").

How: `cpu_blas.cc` is compiled with the system C++ compiler on first use (about 3 s, `-O3 -march=native`;
cached under `$GEN_JAX_CACHE/cpu_blas/`, keyed by the source, jaxlib and the CPU's model and flags) and
registered as XLA FFI targets for the CPU platform. It receives the address of
`cblas_sgemm` from the BLAS library loaded here: MKL's `libmkl_rt` from the `mkl` wheel (the `mkl` extra,
included in `test`), set to its sequential layer, or any CBLAS library named by `$GEN_JAX_CPU_BLAS_LIB`. The
custom calls split their work over XLA's intra-op thread pool, so they use as many cores as XLA's own ops.

When they are used (`enabled()`): float32 operands, the CPU backend with a single device in a single process
(the custom calls carry no sharding rule, so sharded programs keep XLA's ops), a BLAS library and a compiler
found, and `$GEN_JAX_CPU_BLAS` not set to 0 (`force` also uses them with several devices). Otherwise callers
fall back to XLA: results agree to float32 rounding either way. `status()` says which case applies.

All are differentiable in reverse mode to any order (`jax.custom_vjp`: the products' VJPs are products again;
the other kernels' gradients are custom calls too, and their own VJPs are XLA's). Forward mode (`jax.jvp`)
is not supported, as for every custom-VJP function: set `$GEN_JAX_CPU_BLAS=0` for programs that need it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["enabled", "status", "matmul", "conv_kernel_grad", "conv2d_same", "direct_conv_fits", "flipped_transposed_kernel", "adam_step", "attention_softmax", "layer_norm", "group_norm", "ENV_SWITCH", "ENV_LIBRARY"]

ENV_SWITCH = "GEN_JAX_CPU_BLAS"  # 0: off; auto (default): on a single CPU device; force: on any CPU device count
ENV_LIBRARY = "GEN_JAX_CPU_BLAS_LIB"  # path of a shared library exporting cblas_sgemm (default: MKL's mkl_rt)
_SOURCE = Path(__file__).with_name("cpu_blas.cc")
_GEMM = "gen_jax_cpu_blas_gemm_f32"
_CONV_KGRAD = "gen_jax_cpu_blas_conv_kernel_grad_f32"
_CONV_FWD = "gen_jax_cpu_blas_conv_forward_f32"
_DIRECT_CONV = "gen_jax_cpu_direct_conv_f32"
_FLIP_TRANSPOSE = "gen_jax_cpu_flip_transpose_kernel_f32"
_ADAM = "gen_jax_cpu_adam_step_f32"
_ADAM_EMA = "gen_jax_cpu_adam_step_ema_f32"
_SOFTMAX = "gen_jax_cpu_softmax_f32"
_SOFTMAX_GRAD = "gen_jax_cpu_softmax_grad_f32"
_LAYER_NORM = "gen_jax_cpu_layer_norm_f32"
_GROUP_NORM = "gen_jax_cpu_group_norm_f32"
_GROUP_NORM_GRAD = "gen_jax_cpu_group_norm_grad_f32"
_LAYER_NORM_GRAD = "gen_jax_cpu_layer_norm_grad_f32"

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str, and the loaded libraries (kept alive)


def _mkl_rt() -> Path | None:
    """libmkl_rt from the installed `mkl` distribution, if any."""
    from importlib import metadata
    try:
        files = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if Path(str(f)).name.startswith("libmkl_rt.so"):
            path = Path(str(f.locate())).resolve()
            if path.exists():
                return path
    return None


def _load_sgemm():
    """(library, cblas_sgemm address, description)."""
    named = os.environ.get(ENV_LIBRARY)
    if named:
        lib = ctypes.CDLL(named)  # RTLD_LOCAL: its symbols must not displace those of torch's own MKL
        return lib, ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value, named
    path = _mkl_rt()
    if path is None:
        raise OSError("no BLAS library: install the `mkl` extra (pip install 'gen_jax[mkl]') or set "
                      f"${ENV_LIBRARY} to a library exporting cblas_sgemm")
    lib = ctypes.CDLL(str(path))
    # sequential: the custom calls parallelize over XLA's thread pool themselves
    lib.MKL_Set_Threading_Layer.restype = ctypes.c_int
    lib.MKL_Set_Threading_Layer(ctypes.c_int(1))  # MKL_THREADING_SEQUENTIAL
    return lib, ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value, str(path)


_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17")


def _cpu_identity() -> bytes:
    """The CPU model and instruction-set flags (Linux), which -march=native compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "vendor_id")]
    return "\n".join(dict.fromkeys(keep)).encode()


def _build() -> Path:
    """The compiled custom calls, built once per (source, jaxlib) into the cache directory, atomically."""
    from gen_jax.data.assets import cache_dir
    include = jax.ffi.include_dir()
    import jaxlib
    # -march=native: the library is built where it runs; the CPU's identity is in the key so that a cache
    # shared between different machines (a cluster's home directory) never hands one another's code
    key = hashlib.sha256(_SOURCE.read_bytes() + jaxlib.__version__.encode() + include.encode()
                         + " ".join(_FLAGS).encode() + _cpu_identity()).hexdigest()[:16]
    target = cache_dir() / "cpu_blas" / key / "libgen_jax_cpu_blas.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise OSError("no C++ compiler (c++, g++ or clang++ on PATH, or $CXX) to build gen_jax's CPU BLAS calls")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, "-shared", "-fPIC", "-w", f"-I{include}", str(_SOURCE), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"building {_SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent process sees the old state or a whole library
    return target


def _init() -> dict:
    """Load the BLAS and the compiled custom calls once per process; {"ok": bool, "why": str}."""
    with _lock:
        if _state:
            return _state
        if not sys.platform.startswith("linux"):
            _state.update(ok=False, why="only built on Linux")
            return _state
        try:
            blas, sgemm, blas_name = _load_sgemm()
            lib = ctypes.CDLL(str(_build()))
            lib.gen_jax_cpu_blas_set_sgemm(ctypes.c_void_p(sgemm))
            jax.ffi.register_ffi_target(_GEMM, jax.ffi.pycapsule(lib.GenJaxGemmF32), platform="cpu")
            jax.ffi.register_ffi_target(_CONV_KGRAD, jax.ffi.pycapsule(lib.GenJaxConvKernelGradF32), platform="cpu")
            jax.ffi.register_ffi_target(_CONV_FWD, jax.ffi.pycapsule(lib.GenJaxConvForwardF32), platform="cpu")
            jax.ffi.register_ffi_target(_DIRECT_CONV, jax.ffi.pycapsule(lib.GenJaxDirectConvF32), platform="cpu")
            jax.ffi.register_ffi_target(_ADAM, jax.ffi.pycapsule(lib.GenJaxAdamStepF32), platform="cpu")
            jax.ffi.register_ffi_target(_ADAM_EMA, jax.ffi.pycapsule(lib.GenJaxAdamStepEmaF32), platform="cpu")
            jax.ffi.register_ffi_target(_FLIP_TRANSPOSE, jax.ffi.pycapsule(lib.GenJaxFlipTransposeKernelF32),
                                        platform="cpu")
            jax.ffi.register_ffi_target(_SOFTMAX, jax.ffi.pycapsule(lib.GenJaxSoftmaxF32), platform="cpu")
            jax.ffi.register_ffi_target(_SOFTMAX_GRAD, jax.ffi.pycapsule(lib.GenJaxSoftmaxGradF32), platform="cpu")
            jax.ffi.register_ffi_target(_LAYER_NORM, jax.ffi.pycapsule(lib.GenJaxLayerNormF32), platform="cpu")
            jax.ffi.register_ffi_target(_GROUP_NORM, jax.ffi.pycapsule(lib.GenJaxGroupNormF32), platform="cpu")
            jax.ffi.register_ffi_target(_GROUP_NORM_GRAD, jax.ffi.pycapsule(lib.GenJaxGroupNormGradF32),
                                        platform="cpu")
            jax.ffi.register_ffi_target(_LAYER_NORM_GRAD, jax.ffi.pycapsule(lib.GenJaxLayerNormGradF32),
                                        platform="cpu")
        except (OSError, AttributeError) as e:
            _state.update(ok=False, why=str(e))
            return _state
        _state.update(ok=True, why=f"sgemm from {blas_name}", libs=(blas, lib))
        return _state


def _mode() -> str:
    mode = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if mode in ("0", "off", "false", "no"):
        return "off"
    if mode not in ("auto", "1", "on", "true", "yes", "force"):
        raise ValueError(f"${ENV_SWITCH}={mode!r}: use 0 (off), auto (the default) or force")
    return "force" if mode == "force" else "auto"


def _why_off(arrays=()) -> str | None:
    """None when the custom calls run for these operands, else the reason they do not."""
    mode = _mode()
    if mode == "off":
        return f"turned off by ${ENV_SWITCH}"
    dtypes = {str(jnp.result_type(a)) for a in arrays} - {"float32"}
    if dtypes:
        return f"operands of dtype {', '.join(sorted(dtypes))} (only float32 is handled)"
    s = _init()
    if not s["ok"]:
        return s["why"]
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}"
    if mode != "force" and (jax.device_count() > 1 or jax.process_count() > 1):
        return (f"{jax.device_count()} devices in {jax.process_count()} process(es): the custom calls have no "
                f"sharding rule (${ENV_SWITCH}=force uses them anyway, replicated)")
    return None


def status() -> str:
    """Whether the custom calls are used for float32 products in this process, and why not if not."""
    why = _why_off()
    return f"on: {_init()['why']}" if why is None else f"off: {why}"


def enabled(*arrays) -> bool:
    """True when `matmul` / `conv_kernel_grad` run as custom calls for these operands: float32, the CPU
    backend, one device (or `$GEN_JAX_CPU_BLAS=force`: under sharding XLA then gathers the operands and every
    device computes the whole product, which is correct but not faster; tests use it)."""
    return _why_off(arrays) is None


def _gemm_call(a, b, trans_a: bool, trans_b: bool):
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    if trans_a and not trans_b and m >= 2 * n and a.shape[-2] >= 2048:
        # a^T b with a tall result (a weight gradient, e.g. RoFormer's FFN output layer): MKL ran it 20-28%
        # slower than the transposed product (b^T a)^T (K 16384, 1536 x 384: 215 -> 168 ms; one core)
        return jnp.swapaxes(_gemm_call(b, a, True, False), -1, -2)
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    call = jax.ffi.ffi_call(_GEMM, jax.ShapeDtypeStruct(batch + (m, n), jnp.float32), vmap_method="expand_dims")
    return call(a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _gemm(a, b, trans_a, trans_b):
    return _gemm_call(a, b, trans_a, trans_b)


def _gemm_fwd(a, b, trans_a, trans_b):
    # through _gemm itself, so that differentiating this rule (grad of grad) meets the custom VJP again
    return _gemm(a, b, trans_a, trans_b), (a, b)


def _sum_to(x, shape):
    """Sum a batched gradient over the batch axes its operand was broadcast along (size 1 in `shape`)."""
    axes = tuple(i for i, n in enumerate(shape[:-2]) if n == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _gemm_bwd(trans_a, trans_b, res, g):
    a, b = res
    # C = op(A) op(B): dop(A) = G op(B)^T, dop(B) = op(A)^T G, each written as one product of the saved operands
    da = _gemm(b, g, trans_b, True) if trans_a else _gemm(g, b, False, not trans_b)
    db = _gemm(g, a, True, trans_a) if trans_b else _gemm(a, g, not trans_a, False)
    return _sum_to(da, a.shape), _sum_to(db, b.shape)


_gemm.defvjp(_gemm_fwd, _gemm_bwd)


def matmul(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) for float32 [..., m, k] x [..., k, n] (op = transpose of the last two axes where asked),
    batch axes broadcast. A custom call into the BLAS where `enabled`, else `jnp.matmul`."""
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"cpu_blas.matmul needs operands of rank >= 2, got shapes {a.shape} and {b.shape}")
    ka = a.shape[-2] if trans_a else a.shape[-1]
    kb = b.shape[-1] if trans_b else b.shape[-2]
    if ka != kb:
        raise ValueError(f"cpu_blas.matmul: contracted sizes differ ({ka} vs {kb}) for shapes {a.shape} and "
                         f"{b.shape} with trans_a={trans_a}, trans_b={trans_b}")
    if not enabled(a, b):
        t = lambda x, flag: jnp.swapaxes(x, -1, -2) if flag else x  # noqa: E731
        return jnp.matmul(t(a, trans_a), t(b, trans_b), preferred_element_type=jnp.float32).astype(
            jnp.result_type(a, b))
    jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # raises on batch axes that do not broadcast
    if a.ndim != b.ndim:  # the custom call takes equal ranks; missing batch axes broadcast as size 1
        nd = max(a.ndim, b.ndim)
        a = a.reshape((1,) * (nd - a.ndim) + a.shape)
        b = b.reshape((1,) * (nd - b.ndim) + b.shape)
    return _gemm(a, b, trans_a, trans_b)


def _xla_conv_kernel_grad(x, g, k):
    def conv(w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, jnp.zeros((k, k, x.shape[3], g.shape[3]), x.dtype))[1](g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_kernel_grad_call(x, g, k):
    call = jax.ffi.ffi_call(_CONV_KGRAD, jax.ShapeDtypeStruct((k, k, x.shape[3], g.shape[3]), jnp.float32),
                            vmap_method="sequential")
    return call(x, g)


def _conv_kernel_grad_fwd(x, g, k):
    return _conv_kernel_grad_call(x, g, k), (x, g)


def _conv_kernel_grad_bwd(k, res, ct):
    # the kernel gradient is bilinear in (x, g); its VJP (second-order use, e.g. gradient penalties) is XLA's
    return jax.vjp(lambda x, g: _xla_conv_kernel_grad(x, g, k), *res)[1](ct)


_conv_kernel_grad_call.defvjp(_conv_kernel_grad_fwd, _conv_kernel_grad_bwd)


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_size: int) -> jax.Array:
    """dL/dw [k, k, C, O] of y = conv(x, w) with stride 1, "SAME" padding, odd k, NHWC x [B, H, W, C] and output
    gradient g [B, H, W, O]. A custom call where `enabled` (im2col tiles of x, each [m, k k C], times the matching
    rows of g in MKL, summed), else XLA's backward-filter convolution."""
    k = int(kernel_size)
    if x.ndim != 4 or g.ndim != 4 or x.shape[:3] != g.shape[:3] or k % 2 != 1 or k < 1:
        raise ValueError(f"conv_kernel_grad: NHWC x and g with equal [B, H, W] and an odd kernel size expected, "
                         f"got x {x.shape}, g {g.shape}, k {kernel_size}")
    if not enabled(x, g):
        return _xla_conv_kernel_grad(x, g, k)
    return _conv_kernel_grad_call(x, g, k)



@jax.custom_vjp
def _flip_transpose_call(w):
    out = jax.ShapeDtypeStruct(w.shape[:2] + (w.shape[3], w.shape[2]), jnp.float32)
    return jax.ffi.ffi_call(_FLIP_TRANSPOSE, out, vmap_method="sequential")(w)


def _flip_transpose_fwd(w):
    return _flip_transpose_call(w), None


def _flip_transpose_bwd(_, ct):
    return (_flip_transpose_call(ct),)  # a permutation that is its own inverse, so its own transpose


_flip_transpose_call.defvjp(_flip_transpose_fwd, _flip_transpose_bwd)


def flipped_transposed_kernel(w: jax.Array) -> jax.Array:
    """The kernel whose SAME convolution of g is the input gradient: w[k-1-i, k-1-j] with C and O swapped,
    [k, k, C, O] -> [k, k, O, C]. A blocked custom call where `enabled` (XLA:CPU's transpose of 256 x 256
    planes ran at ~0.3 GB/s, 5 ms per 3x3 256->256 kernel), else `jnp.flip(...).transpose(...)`."""
    if w.ndim != 4:
        raise ValueError(f"flipped_transposed_kernel: an HWIO kernel [kh, kw, C, O] expected, got shape {w.shape}")
    if not enabled(w):
        return jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    return _flip_transpose_call(w)


def direct_conv_fits(c: int, o: int) -> bool:
    """Layers the direct (register-blocked, no BLAS) kernel takes: at most 16 input channels and 16, 32, 48 or 64
    outputs, where XLA:CPU's convolution is slowest (B64 28x28, one core: 16->16 50 -> 91 GFLOP/s, 1->16 6 -> 43);
    from 32 input channels on the two are equal."""
    return c <= 16 and o % 16 == 0 and 16 <= o <= 64


@jax.custom_vjp
def _conv_same_call(x, w):
    target = _DIRECT_CONV if direct_conv_fits(w.shape[2], w.shape[3]) else _CONV_FWD
    out = jax.ShapeDtypeStruct(x.shape[:3] + (w.shape[3],), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, w)


def _conv_same_fwd(x, w):
    return _conv_same_call(x, w), (x, w)


def _conv_same_bwd(res, g):
    x, w = res
    return _conv_same_call(g, flipped_transposed_kernel(w)), conv_kernel_grad(x, g, w.shape[0])


_conv_same_call.defvjp(_conv_same_fwd, _conv_same_bwd)


def conv2d_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """y = conv(x, w) with stride 1 and "SAME" padding for an odd square kernel, NHWC x [B, H, W, C] and HWIO w
    [k, k, C, O]. Where `enabled`: for narrow layers (`direct_conv_fits`) a direct register-blocked kernel, else
    im2col in L2-sized tiles of output rows, each one MKL product with the kernel as a [k k C, O] matrix. Its
    input gradient is the same call on the flipped, transposed kernel, its kernel gradient `conv_kernel_grad`.
    Otherwise XLA's convolution."""
    k = w.shape[0] if w.ndim == 4 else 0
    if x.ndim != 4 or w.ndim != 4 or w.shape[1] != k or k % 2 != 1 or w.shape[2] != x.shape[3]:
        raise ValueError(f"conv2d_same: NHWC x [B, H, W, C] and an odd square HWIO kernel [k, k, C, O] expected, "
                         f"got x {x.shape}, w {w.shape}")
    if not enabled(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _conv_same_call(x, w)

NEG_LOGIT = -1e30  # what masked logits become: finite, so that a fully masked row is uniform rather than NaN


def _xla_attention_softmax(scores, mask, scale):
    scores = scores * jnp.asarray(scale, scores.dtype)
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, NEG_LOGIT)
    return jax.nn.softmax(scores, axis=-1)


def _xla_attention_softmax_grad(probs, g, mask, scale):
    dx = jnp.asarray(scale, probs.dtype) * probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True))
    return jnp.where(mask[:, None], dx, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_call(scores, mask, scale):
    call = jax.ffi.ffi_call(_SOFTMAX, jax.ShapeDtypeStruct(scores.shape, jnp.float32), vmap_method="sequential")
    return call(scores, mask, scale=np.float32(scale))


def _softmax_fwd(scores, mask, scale):
    probs = _softmax_call(scores, mask, scale)
    return probs, (probs, mask)


def _softmax_bwd(scale, res, g):
    probs, mask = res
    return _softmax_grad_call(probs, g, mask, scale), None


_softmax_call.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_grad_call(probs, g, mask, scale):
    call = jax.ffi.ffi_call(_SOFTMAX_GRAD, jax.ShapeDtypeStruct(probs.shape, jnp.float32), vmap_method="sequential")
    return call(probs, g, mask, scale=np.float32(scale))


def _softmax_grad_fwd(probs, g, mask, scale):
    return _softmax_grad_call(probs, g, mask, scale), (probs, g, mask)


def _softmax_grad_bwd(scale, res, ct):
    # second order (grad of grad): the VJP of the closed form, by XLA
    probs, g, mask = res
    dp, dg = jax.vjp(lambda p, g: _xla_attention_softmax_grad(p, g, mask, scale), probs, g)[1](ct)
    return dp, dg, None


_softmax_grad_call.defvjp(_softmax_grad_fwd, _softmax_grad_bwd)


def attention_softmax(scores_BxNxTxS: jax.Array, scale: float, mask_BxTxS: jax.Array | None = None) -> jax.Array:
    """softmax(where(mask, scale * scores, -1e30)) over the last axis: attention probabilities from raw q.k
    scores [B, N, T, S], a boolean mask [B or 1, T or 1, S] (True = attend) broadcast over the heads, or None.

    Where `enabled`, one fused custom call (and one for its gradient) that reads and writes each score once;
    XLA:CPU spends about 1.5x the time on the same formula at B32 N6 T512 (benchmarks/RESULTS.md). Otherwise
    the formula in jax.numpy. Both agree to float32 rounding."""
    if scores_BxNxTxS.ndim != 4:
        raise ValueError(f"attention_softmax: scores [B, N, T, S] expected, got shape {scores_BxNxTxS.shape}")
    B, _, T, S = scores_BxNxTxS.shape
    if mask_BxTxS is not None:
        ms = mask_BxTxS.shape
        if len(ms) != 3 or ms[0] not in (1, B) or ms[1] not in (1, T) or ms[2] != S:
            raise ValueError(f"attention_softmax: mask of shape {ms} does not broadcast as [B or 1, T or 1, S] "
                             f"to scores {scores_BxNxTxS.shape}")
    if not enabled(scores_BxNxTxS):
        return _xla_attention_softmax(scores_BxNxTxS, mask_BxTxS, scale)
    mask = jnp.ones((1, 1, S), bool) if mask_BxTxS is None else mask_BxTxS.astype(bool)
    return _softmax_call(scores_BxNxTxS, mask, float(scale))


def _xla_layer_norm(x, scale, bias, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + jnp.asarray(eps, x.dtype)) * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_call(x, scale, bias, eps):
    call = jax.ffi.ffi_call(_LAYER_NORM, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    return call(x, scale, bias, eps=np.float32(eps))


def _layer_norm_fwd(x, scale, bias, eps):
    return _layer_norm_call(x, scale, bias, eps), (x, scale)


def _layer_norm_bwd(eps, res, g):
    x, scale = res
    return _layer_norm_grad_call(x, scale, g, eps)


_layer_norm_call.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _xla_layer_norm_vjp(x, scale, g, eps):
    return jax.vjp(lambda x, s, b: _xla_layer_norm(x, s, b, eps), x, scale, jnp.zeros_like(scale))[1](g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_grad_call(x, scale, g, eps):
    d = x.shape[-1]
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32),
           jax.ShapeDtypeStruct((d,), jnp.float32))
    return tuple(jax.ffi.ffi_call(_LAYER_NORM_GRAD, out, vmap_method="sequential")(x, scale, g, eps=np.float32(eps)))


def _layer_norm_grad_fwd(x, scale, g, eps):
    return _layer_norm_grad_call(x, scale, g, eps), (x, scale, g)


def _layer_norm_grad_bwd(eps, res, ct):
    # second order: XLA's VJP of the closed-form gradient
    return jax.vjp(lambda x, s, g: _xla_layer_norm_vjp(x, s, g, eps), *res)[1](ct)


_layer_norm_grad_call.defvjp(_layer_norm_grad_fwd, _layer_norm_grad_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, (x - mean) / sqrt(var + eps) * scale + bias, with the two-pass variance.

    Where `enabled` and the last axis is a multiple of 16: one custom call forward and one backward (dx, dscale,
    dbias in a single pass over x and the cotangent); otherwise the formula in jax.numpy."""
    d = x.shape[-1] if x.ndim else 0
    if scale.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"layer_norm: scale {scale.shape} and bias {bias.shape} must be [{d}] for x {x.shape}")
    if not enabled(x, scale, bias) or d == 0 or d % 16 or x.size == 0:
        return _xla_layer_norm(x, scale, bias, eps)
    return _layer_norm_call(x, scale, bias, float(eps))


def _xla_group_norm(x, scale, bias, groups, eps, silu):
    """GroupNorm over all axes but the batch's within each group of channels (two-pass variance), then SiLU."""
    shape = x.shape
    xg = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    z = ((xg - mean) * lax.rsqrt(var + jnp.asarray(eps, x.dtype))).reshape(shape) * scale + bias
    return z * jax.nn.sigmoid(z) if silu else z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_call(x, scale, bias, groups, eps, silu):
    call = jax.ffi.ffi_call(_GROUP_NORM, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    return call(x, scale, bias, groups=np.int64(groups), eps=np.float32(eps), silu=bool(silu))


def _group_norm_fwd(x, scale, bias, groups, eps, silu):
    return _group_norm_call(x, scale, bias, groups, eps, silu), (x, scale, bias)


def _group_norm_bwd(groups, eps, silu, res, g):
    return _group_norm_grad_call(*res, g, groups, eps, silu)


_group_norm_call.defvjp(_group_norm_fwd, _group_norm_bwd)


def _xla_group_norm_vjp(x, scale, bias, g, groups, eps, silu):
    return jax.vjp(lambda x, s, b: _xla_group_norm(x, s, b, groups, eps, silu), x, scale, bias)[1](g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _group_norm_grad_call(x, scale, bias, g, groups, eps, silu):
    c = x.shape[-1]
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((c,), jnp.float32),
           jax.ShapeDtypeStruct((c,), jnp.float32))
    call = jax.ffi.ffi_call(_GROUP_NORM_GRAD, out, vmap_method="sequential")
    return tuple(call(x, scale, bias, g, groups=np.int64(groups), eps=np.float32(eps), silu=bool(silu)))


def _group_norm_grad_fwd(x, scale, bias, g, groups, eps, silu):
    return _group_norm_grad_call(x, scale, bias, g, groups, eps, silu), (x, scale, bias, g)


def _group_norm_grad_bwd(groups, eps, silu, res, ct):
    # second order: XLA's VJP of the closed-form gradient
    return jax.vjp(lambda *a: _xla_group_norm_vjp(*a, groups, eps, silu), *res)[1](ct)


_group_norm_grad_call.defvjp(_group_norm_grad_fwd, _group_norm_grad_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float, *,
               silu: bool = False) -> jax.Array:
    """GroupNorm of channels-last x [B, ..., C] (statistics over every axis but B within each of `num_groups`
    groups of adjacent channels, two-pass variance), times scale plus bias, then SiLU if `silu`.

    Where `enabled` and C is a multiple of 16: one custom call forward and one backward, each a pass per image
    held in cache, where XLA:CPU makes several over memory; otherwise the formula in jax.numpy."""
    if x.ndim < 2:
        raise ValueError(f"group_norm: x [B, ..., C] expected, got shape {x.shape}")
    c = x.shape[-1]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups")
    if scale.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"group_norm: scale {scale.shape} and bias {bias.shape} must be [{c}] for x {x.shape}")
    if not enabled(x, scale, bias) or c % 16 or x.size == 0:
        return _xla_group_norm(x, scale, bias, int(num_groups), eps, silu)
    return _group_norm_call(x, scale, bias, int(num_groups), float(eps), bool(silu))


def adam_step(param: jax.Array, grad: jax.Array, mu: jax.Array, nu: jax.Array, scalars: jax.Array, *,
              b1: float, b2: float, eps: float, eps_root: float = 0.0, ema: jax.Array | None = None,
              ema_decay: float | None = None) -> tuple[jax.Array, ...]:
    """One Adam step of one float32 tensor in one pass, the results aliasing param, mu, nu (and ema):
    optax's `clip_by_global_norm` + `scale_by_adam` + `scale_by_learning_rate` + `apply_updates`, in optax's
    order of operations (no FMA contraction), and with `ema` the trainer's EMA of the new parameters.

    `scalars` = float32 [clip trigger (1.0 where g_norm < max_norm: no clipping), g_norm, max_norm,
    1 - b1^t, 1 - b2^t, -learning_rate, finite (0.0: leave everything as it was)], t the incremented count.
    Returns (param, mu, nu) or (param, mu, nu, ema). Only where `enabled` (a CPU custom call, no gradient):
    the caller keeps the optax path for the other cases (`gen_jax.train.step.make_update_fn` does)."""
    arrays = (param, grad, mu, nu) + (() if ema is None else (ema,))
    if not enabled(*arrays, scalars):
        raise ValueError(f"cpu_blas.adam_step: not enabled for these operands ({_why_off(arrays)})")
    if any(a.shape != param.shape for a in arrays) or scalars.shape != (7,):
        raise ValueError(f"cpu_blas.adam_step: param, grad, mu, nu (and ema) of one shape and 7 scalars expected, "
                         f"got {[a.shape for a in arrays]} and {scalars.shape}")
    attrs = dict(b1=np.float32(b1), one_minus_b1=np.float32(1 - b1), b2=np.float32(b2),
                 one_minus_b2=np.float32(1 - b2), eps=np.float32(eps), eps_root=np.float32(eps_root))
    out = jax.ShapeDtypeStruct(param.shape, jnp.float32)
    if ema is None:
        call = jax.ffi.ffi_call(_ADAM, (out,) * 3, input_output_aliases={0: 0, 2: 1, 3: 2})
        return tuple(call(param, grad, mu, nu, scalars, **attrs))
    if ema_decay is None:
        raise ValueError("cpu_blas.adam_step: ema given without ema_decay")
    call = jax.ffi.ffi_call(_ADAM_EMA, (out,) * 4, input_output_aliases={0: 0, 2: 1, 3: 2, 4: 3})
    return tuple(call(param, grad, mu, nu, ema, scalars, ema_decay=np.float32(ema_decay),
                      one_minus_ema_decay=np.float32(1.0 - ema_decay), **attrs))
