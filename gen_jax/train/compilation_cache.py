"""JAX's persistent compilation cache, on by default for gen_jax's launchers.

On CPU, XLA compiles dominate short runs: the DDPM `tiny` launcher run (a 45k-parameter U-Net, 10 steps, 8
host devices) spends most of its 79 s compiling, one program per eager weight initializer among them (a
threefry `uniform` of one kernel shape alone compiles in 0.3-4 s here). JAX can keep compiled programs on
disk, keyed by the program, its compile options, the devices and the jaxlib version, so a re-run, a resumed
run or another process of a multi-process launch loads them instead of compiling: the same `tiny` run takes
26 s the second time, with identical results. Only process 0 writes entries (JAX's rule).

`enable_compilation_cache()` points JAX at `$GEN_JAX_CACHE/xla` unless a cache directory is already set (by
`JAX_COMPILATION_CACHE_DIR` or `jax.config`), which then wins. `GEN_JAX_COMPILATION_CACHE=0` turns it off.
The cache is size-limited (least recently used entries evicted) and its reads and writes are locked through
`filelock` (a dependency), so concurrent processes never read a half-written entry.
"""
from __future__ import annotations

import os

import jax

from gen_jax.data.assets import cache_dir

DISABLE_ENV = "GEN_JAX_COMPILATION_CACHE"


def enable_compilation_cache(directory: str | os.PathLike | None = None, *, min_compile_time_s: float = 0.1,
                             max_size_bytes: int = 4 << 30) -> str | None:
    """Turn on JAX's persistent compilation cache; returns the directory in use (None when turned off).

    Call it before the first compile of the process (launchers do, first thing). `min_compile_time_s`: programs
    that compile faster are not stored (reading an entry costs a few ms). `max_size_bytes`: the cache is
    trimmed to this size, least recently used entries first.
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    if min_compile_time_s < 0 or max_size_bytes <= 0:
        raise ValueError(f"min_compile_time_s must be >= 0 and max_size_bytes > 0 (got {min_compile_time_s}, "
                         f"{max_size_bytes})")
    current = getattr(jax.config, "jax_compilation_cache_dir", None)  # set by the env var or the user
    if current:
        return current
    directory = str(directory or os.path.join(cache_dir(), "xla"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_compilation_cache_max_size", int(max_size_bytes))  # LRU-trimmed and locked (filelock)
    return directory
