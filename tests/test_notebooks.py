"""The notebooks execute from top to bottom on small budgets, so they never rot."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMALL = {
    "quickstart.ipynb": {"QUICKSTART_SETUP": "COMPOSITE_1", "QUICKSTART_EPOCHS": "1", "QUICKSTART_BATCHES": "3",
                         "QUICKSTART_SAMPLES": "1000", "QUICKSTART_TRACKING": "none"},
    "custom_model.ipynb": {"CUSTOM_EPOCHS": "1", "CUSTOM_BATCHES": "5"},
    "ptls_coles.ipynb": {"PTLS_CLIENTS": "200", "PTLS_MAX_LEN": "60", "PTLS_HIDDEN": "16", "PTLS_EPOCHS": "1"},
}


def run_notebook(name: str, cwd: Path) -> nbformat.NotebookNode:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return book


def text_of(book: nbformat.NotebookNode) -> str:
    return "\n".join(out.get("text", "") for cell in book.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_executes_on_a_small_budget(tmp_path, monkeypatch, name):
    for key, value in {**SMALL[name], "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(key, value)
    book = run_notebook(name, tmp_path)
    text = text_of(book)
    if name == "quickstart.ipynb":
        assert "COMPOSITE_1" in text and "reloaded model gives the same outputs: True" in text
        assert (tmp_path / "composition_results" / "COMPOSITE_1_quickstart" / "nodes.png").stat().st_size > 1000
    elif name == "ptls_coles.ipynb":
        scores = tmp_path / "composition_results" / "PTQ_1_coles_embeddings" / "scores_3_ptq_dynamic.csv"
        assert scores.stat().st_size > 1000 and "downstream accuracy" in text and "x smaller" in text
        assert "PaddedBatch" in text and "recall_top_k" in text
    else:
        assert "['training_model', 'low_rank_model']" in text and "#compressed latency:" in text
        assert (tmp_path / "composition_results" / "FINETUNE_mlp_decomposed" / "final" / "state.pt").exists()
