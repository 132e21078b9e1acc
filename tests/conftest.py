"""Test setup: 8 fake CPU devices, set before JAX is first imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"] if "device_count" in os.environ["XLA_FLAGS"] else (
    os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's optimization level for XLA:CPU code: tests check numbers, not the speed of the generated code, and at
# -O0 compiles take a fraction of the time (seven threefry initializers of kernel shapes: 7.7 s -> 1.2 s; the
# DDPM `tiny` launcher run, compilation cache off: 73 s -> 54 s, bit-identical FID and bits/dim). XLA's own
# HLO passes, which decide fusion and numerics, run as always. An optimization level already set is kept.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("GEN_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gen_jax"))
# One persistent XLA compilation cache for the whole run, shared by the workers, the launcher subprocesses
# and the notebook kernels (what a launcher turns on, gen_jax.train.enable_compilation_cache): programs that
# several tests compile (the tiny presets' steps and samplers, initializers of the same shapes) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["GEN_JAX_CACHE"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
