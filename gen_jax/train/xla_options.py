"""Per-function XLA compiler options for the CPU backend.

XLA:CPU (jaxlib 0.10) hands dots, elementwise ops and reductions to YNNPACK "library fusions" by default.
For the matmul-bound train steps of small transformers that is slower than XLA's own Eigen GEMMs: the FLASH
launcher's model (d = 128, T = 512, B = 8) trains ~1.2x faster with them off, the FLASH benchmark model (d = 256,
T = 512-2048) 1.08-1.15x (benchmarks/RESULTS.md, "YNNPACK fusions per jit"), while the short-sequence RoFormer
encoder is faster with them on and the DDPM U-Net about the same. So the choice is per compiled
function (`jax.jit(..., compiler_options=...)`), not a process-wide `XLA_FLAGS`, and only on the CPU.

The option is experimental: a jaxlib that no longer knows it would reject it at compile time, so
`cpu_compiler_options` checks it once against a tiny compile and falls back to no options (with a warning).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's CPU compiler accepts `options` (compiles a two-element sum with them)."""
    try:
        jax.jit(lambda x: x.sum(), compiler_options=dict(options)).lower(
            jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
    except Exception as e:  # XLA raises INVALID_ARGUMENT for unknown options or values
        warnings.warn(f"XLA:CPU rejected compiler options {dict(options)} ({str(e).splitlines()[0][:200]}); "
                      "compiling with the defaults instead", RuntimeWarning, stacklevel=3)
        return False
    return True


def cpu_compiler_options(*, ynn_fusions: bool = True, backend: str | None = None) -> dict[str, str] | None:
    """Compiler options for `jax.jit(..., compiler_options=...)` of a train step.

    ynn_fusions: False turns XLA:CPU's YNNPACK library fusions off for that function (dots then run as
    XLA's Eigen GEMMs). Returns None (the defaults) when nothing is to change: `ynn_fusions=True`, a
    backend other than the CPU (`backend` defaults to `jax.default_backend()`), or a jaxlib that rejects
    the option.
    """
    if ynn_fusions or (backend or jax.default_backend()) != "cpu":
        return None
    options = {YNN_FUSION_OPTION: ""}
    return options if _accepted(tuple(sorted(options.items()))) else None
