"""Test setup: 8 fake CPU devices, set before JAX is first imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"] if "device_count" in os.environ["XLA_FLAGS"] else (
    os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("GEN_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gen_jax"))
