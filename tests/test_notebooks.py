"""The Colab notebooks (colab/*.ipynb): committed without outputs, and each runs top to bottom.

The execution test starts a Jupyter kernel on this interpreter (sys.executable, so it sees this venv's
gen_jax) and runs every cell with GEN_JAX_NOTEBOOK_SMOKE=1, which each notebook reads to shrink its runs to
the smallest sizes. It is marked `notebooks` (run with `pytest -m notebooks`); it takes minutes, not seconds.
New notebooks in colab/ are picked up automatically.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def _load_strip_tool():
    spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "tools" / "strip_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


strip_tool = _load_strip_tool()


def _dirty_notebook() -> dict:
    """A notebook as Jupyter/Colab saves it after a run: outputs, counts, widget and Colab metadata."""
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                     "language_info": {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"},
                     "colab": {"name": "x.ipynb", "provenance": [{"file_id": "abc"}], "toc_visible": True},
                     "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}},
        "cells": [
            {"cell_type": "markdown", "id": "m1", "metadata": {"id": "colab-id"}, "source": "# Title"},
            {"cell_type": "code", "id": "c1", "execution_count": 7,
             "metadata": {"colab": {"base_uri": "https://localhost:8080/"}, "outputId": "x", "tags": ["keep"]},
             "outputs": [{"output_type": "stream", "name": "stdout", "text": "hello\n"}],
             "source": "print('hello')"},
        ],
    }


def test_strip_removes_outputs_counts_and_metadata_noise_and_keeps_sources():
    dirty = _dirty_notebook()
    clean = strip_tool.strip_notebook(dirty)
    code = clean["cells"][1]
    assert code["outputs"] == [] and code["execution_count"] is None
    assert code["metadata"] == {"tags": ["keep"]} and clean["cells"][0]["metadata"] == {}
    assert [c["source"] for c in clean["cells"]] == ["# Title", "print('hello')"]
    assert [c["id"] for c in clean["cells"]] == ["m1", "c1"]
    assert clean["metadata"] == {"kernelspec": dirty["metadata"]["kernelspec"],
                                 "language_info": {"name": "python"},
                                 "colab": {"name": "x.ipynb", "provenance": []}}
    assert dirty["cells"][1]["outputs"], "strip_notebook must not modify its input"
    assert not strip_tool.is_stripped(dirty) and strip_tool.is_stripped(clean)
    assert strip_tool.strip_notebook(clean) == clean  # idempotent


def test_strip_check_mode_fails_on_a_dirty_notebook_and_in_place_stripping_fixes_it(tmp_path, capsys):
    path = tmp_path / "dirty.ipynb"
    path.write_text(json.dumps(_dirty_notebook()))
    assert strip_tool.main(["--check", str(tmp_path)]) == 1
    assert "dirty.ipynb" in capsys.readouterr().err
    assert json.loads(path.read_text())["cells"][1]["outputs"], "--check must not change files"
    assert strip_tool.main([str(path)]) == 0
    assert strip_tool.main(["--check", str(path)]) == 0
    text = path.read_text()
    assert strip_tool.main([str(path)]) == 0 and path.read_text() == text  # stable on disk


def test_there_is_a_notebook_per_paper_at_least_ddpm():
    assert "ddpm" in IDS, f"colab/ddpm.ipynb is missing; found {IDS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_stripped(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))  # raises if malformed
    assert strip_tool.is_stripped(nb), (f"{path.relative_to(ROOT)} has outputs, execution counts or metadata "
                                        "noise; run `python tools/strip_notebooks.py` before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_has_install_cell_and_reads_smoke_flag(path):
    sources = ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
               if c["cell_type"] == "code"]
    assert sources and "import gen_jax" in sources[0] and "pip" in sources[0], (
        "the first code cell must install gen_jax when it is not importable")
    assert any("GEN_JAX_NOTEBOOK_SMOKE" in s for s in sources), (
        "the notebook must read GEN_JAX_NOTEBOOK_SMOKE to shrink its runs for CI")


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernelspec for this very interpreter, so the notebook sees the test environment's packages."""
    jupyter_client = pytest.importorskip("jupyter_client.kernelspec")
    pytest.importorskip("ipykernel")
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / "gen_jax_test").mkdir()
    (kernels / "gen_jax_test" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gen_jax test", "language": "python"}))
    return jupyter_client.KernelSpecManager(kernel_dirs=[str(kernels)])


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom_in_smoke_mode(path, kernel_spec_manager, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.manager import KernelManager

    monkeypatch.setenv("GEN_JAX_NOTEBOOK_SMOKE", "1")  # inherited by the kernel process
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="gen_jax_test", kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(nb, km=km, timeout=900, allow_errors=False,
                                     resources={"metadata": {"path": str(COLAB)}})
    try:
        client.execute()  # raises CellExecutionError with the failing cell's traceback
    finally:
        # nbclient leaves a kernel it did not start running: without this each notebook's kernel (1-2 GB,
        # polling) lived until the pytest worker exited
        if km.has_kernel:
            km.shutdown_kernel(now=True)

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), (
        f"{path.name} displayed no picture; show sample grids or curves with IPython.display.Image")
