"""Thin launchers, one per paper: `python -m experiments.<paper> --help`.

Started as `python -m experiments.<paper>` on a CPU-only install, a launcher first restarts itself under the
glibc malloc settings of `gen_jax.host_memory` (faster XLA:CPU steps; `GEN_JAX_MALLOC_TUNING=0` turns it off).
This runs while the package is imported, before the launcher imports JAX, so the restart costs no JAX start-up.
"""
import sys


def _launched_as_module() -> bool:
    # while `python -m experiments.x` locates the module, sys.argv[0] is "-m"; imports from tests or notebooks
    # (or `python -m pytest`, whose argv[0] is a path by the time it imports this package) never match
    if not sys.argv or sys.argv[0] != "-m":
        return False
    orig = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and i + 1 < len(orig) and orig[i + 1].startswith("experiments.")
               for i, a in enumerate(orig))


if _launched_as_module():
    from gen_jax.host_memory import reexec_if_untuned

    reexec_if_untuned()
