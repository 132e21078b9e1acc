"""`import gen_jax.metrics` stays light: no JAX, no Flax, no training until a metric is used."""
import subprocess
import sys


def test_importing_metrics_loads_neither_jax_nor_the_classifier():
    code = ("import sys, gen_jax.metrics as m; "
            "assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'heavy import'; "
            "assert callable(m.frechet_distance) and 'gen_jax.metrics.classifier' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
