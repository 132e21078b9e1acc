"""The package surface: `import gen_jax` stays cheap, and every public package lists its API with docstrings."""
import importlib
import inspect
import json
import subprocess
import sys

import pytest

# Never imported by `import gen_jax` alone (nor JAX/Flax: paper packages load on first attribute access).
HEAVY = ("torch", "transformers", "tensorflow", "tensorflow_datasets", "orbax", "optax", "sklearn", "scipy",
         "jax", "flax", "diffusers")
# Only the tests and the users' own code need these; no library package may import them.
TEST_ONLY = ("torch", "transformers", "tensorflow", "diffusers", "sklearn")
PUBLIC = ("config", "errors", "images", "data", "train", "metrics", "nn", "ddpm", "flash", "gan", "hubness", "vae",
          "vae.vmf", "roformer", "roformer_sim", "host_memory")


def _imported_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


def test_import_gen_jax_loads_no_heavy_dependency_and_papers_load_on_attribute_access():
    loaded = _imported_after("import gen_jax")
    assert not loaded & set(HEAVY), f"`import gen_jax` imported {sorted(loaded & set(HEAVY))}"
    # The lazy attributes still work, and only then pull in JAX.
    code = ("import gen_jax, sys; s = gen_jax.ddpm.linear_schedule(10); assert s.betas.shape == (10,); "
            "assert 'jax' in sys.modules and 'ddpm' in dir(gen_jax); from gen_jax import flash; "
            "assert callable(flash.mixed_chunk_attention)")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        importlib.import_module("gen_jax").nope


def test_library_packages_never_import_test_only_dependencies():
    loaded = _imported_after("import " + ", ".join(f"gen_jax.{p}" for p in PUBLIC))
    assert not loaded & set(TEST_ONLY), sorted(loaded & set(TEST_ONLY))


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_package_lists_its_api_with_docstrings(name):
    module = importlib.import_module(f"gen_jax.{name}")
    assert (module.__doc__ or "").strip(), f"gen_jax.{name} has no module docstring"
    exported = getattr(module, "__all__", None)
    assert exported, f"gen_jax.{name} has no __all__"
    assert len(set(exported)) == len(exported), f"duplicates in gen_jax.{name}.__all__"
    undocumented = []
    for attr in exported:
        obj = getattr(module, attr)  # every listed name resolves
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = obj.__doc__ or ""
            auto = inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")  # dataclass's generated signature
            if not doc.strip() or auto:
                undocumented.append(attr)
    assert not undocumented, f"gen_jax.{name}: no docstring on {undocumented}"
