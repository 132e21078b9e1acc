"""The persistent XLA compilation cache the launchers turn on: a second process loads what the first compiled."""
import json
import os
import subprocess
import sys

import jax
import pytest

from gen_jax.train import enable_compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Turns the cache on the way a launcher does, compiles one program and reports the cache's answer.
PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from gen_jax.train import enable_compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                       if event == "/jax/compilation_cache/cache_hits" else None)
directory = enable_compilation_cache(min_compile_time_s=0.0)
x = jnp.linspace(0.0, 3.0, 4096).reshape(64, 64)
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * jnp.cos(x).prod(axis=1))(x)
print(json.dumps({"dir": directory, "hits": len(hits), "y": [float(v) for v in y]}))
"""


def _run(env):
    proc = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_compiled_program_from_gen_jax_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env.update(GEN_JAX_CACHE=str(tmp_path), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    first = _run(env)
    assert first["dir"] == str(tmp_path / "xla") and first["hits"] == 0
    assert any(name.endswith("-cache") for name in os.listdir(tmp_path / "xla"))
    second = _run(env)
    assert second["hits"] >= 1 and second["y"] == first["y"]
    # Turned off by the environment: nothing read or written.
    off = _run(dict(env, GEN_JAX_CACHE=str(tmp_path / "other"), GEN_JAX_COMPILATION_CACHE="0"))
    assert off["dir"] is None and off["hits"] == 0 and not (tmp_path / "other" / "xla").exists()
    assert off["y"] == first["y"]


def test_a_cache_directory_already_chosen_wins_and_bad_limits_are_rejected(tmp_path):
    chosen = jax.config.jax_compilation_cache_dir
    assert chosen, "tests/conftest.py sets JAX_COMPILATION_CACHE_DIR"
    assert enable_compilation_cache(tmp_path) == chosen
    assert jax.config.jax_compilation_cache_dir == chosen
    with pytest.raises(ValueError, match="min_compile_time_s"):
        enable_compilation_cache(min_compile_time_s=-1)
    with pytest.raises(ValueError, match="max_size_bytes"):
        enable_compilation_cache(max_size_bytes=0)
