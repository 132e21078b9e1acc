"""gen_jax: generative-model papers reimplemented in JAX/Flax NNX.

Importing the package is cheap: paper packages are imported on first use
(`gen_jax.ddpm`, `gen_jax.flash`, ...), and nothing here imports JAX.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("config", "data", "train", "metrics", "images", "nn", "errors", "ddpm", "flash", "gan",
               "hubness", "vae", "roformer", "roformer_sim", "host_memory")
__all__ = list(_SUBMODULES)  # `from gen_jax import *` imports every paper package


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"gen_jax.{name}")
    raise AttributeError(f"module 'gen_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
