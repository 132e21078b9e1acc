"""Host-memory settings that make XLA:CPU steps faster on Linux/glibc.

XLA:CPU allocates each compiled call's scratch buffer (hundreds of MB for a train step) with `malloc`, from
the thread that runs the call. glibc serves allocations that large with a fresh `mmap` and returns them with
`munmap` on free, so every step page-faults its whole scratch buffer in again (~150k faults and 0.3-0.7 s of
kernel time per RoFormer step here). Three glibc tunables keep that memory in the heap for reuse:

- `glibc.malloc.mmap_max=0`: large blocks come from the heap, not from `mmap`;
- `glibc.malloc.arena_max=1`: XLA's worker threads use the main heap (a thread arena would still `mmap`
  blocks larger than its 64 MB heap, whatever `mmap_max` says);
- `glibc.malloc.trim_threshold=1099511627776` (1 TiB): a freed block at the top of the heap is not given back.
  It has to exceed the largest scratch buffer: a RoFormer L6 H384 step at B32 T512 needs 5.25 GiB, and under
  the 4 GiB threshold used before it was trimmed and faulted in again every step (27-40 s -> 23.5-25.7 s a step).

Measured on the 2-core development box (benchmarks/RESULTS.md, one core, side by side): DDPM MNIST train step
71 -> 117 images/s, CIFAR-10 U-Net 1.07 -> 1.52, RoFormer L6 H384 fwd+bwd 2.96 -> 2.43 s at seq 64. The cost
is a resident heap at its high-water mark and one lock for all threads' mallocs (harmless for XLA, whose hot
loops do not allocate).

glibc reads tunables once, at process start (`mallopt` after start does not reach the existing thread
arenas), so they are set through the environment: `tuned_environ` returns it, and `reexec_if_untuned` re-runs
the current command line under it. The launchers (`python -m experiments.<paper>`) call the latter on CPU-only
installs before importing JAX; `GEN_JAX_MALLOC_TUNING=0` turns it off.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["TUNABLES", "OPT_OUT", "tuned_environ", "is_tuned", "applies", "reexec_if_untuned"]

TUNABLES: dict[str, str] = {
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
OPT_OUT = "GEN_JAX_MALLOC_TUNING"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _parse(value: str) -> dict[str, str]:
    out = {}
    for item in value.split(":"):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def tuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ` (default os.environ) whose GLIBC_TUNABLES has the settings above added. Settings
    the user already made for the same tunables are kept."""
    env = dict(os.environ if environ is None else environ)
    have = _parse(env.get("GLIBC_TUNABLES", ""))
    merged = {**TUNABLES, **have}
    env["GLIBC_TUNABLES"] = ":".join(f"{k}={v}" for k, v in merged.items())
    return env


def is_tuned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether GLIBC_TUNABLES in `environ` (default os.environ) already sets every tunable above."""
    have = _parse((os.environ if environ is None else environ).get("GLIBC_TUNABLES", ""))
    return all(k in have for k in TUNABLES)


def _module_found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def applies(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a re-exec would help: Linux with glibc, not opted out, not tuned already, and JAX will run on
    the CPU (JAX_PLATFORMS is cpu, or no GPU/TPU plugin is installed)."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off") or is_tuned(env):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(_module_found(m) for m in _ACCELERATOR_PLUGINS)


def reexec_if_untuned(argv: list[str] | None = None) -> None:
    """Replace this process by the same command under `tuned_environ()` when `applies()`; otherwise return.
    Call it first thing in a `__main__` block (the process is replaced, so nothing before it is kept; the pid
    and open stdio stay)."""
    if not applies():
        return
    args = list(sys.orig_argv if argv is None else argv)
    print(f"[gen_jax] restarting under GLIBC_TUNABLES={tuned_environ()['GLIBC_TUNABLES']} for faster XLA:CPU "
          f"steps (set {OPT_OUT}=0 to skip)", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, *args[1:]], tuned_environ())
