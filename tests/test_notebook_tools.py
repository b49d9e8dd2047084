"""What the notebooks stand on: the papermill batch runner, the slider, the figures, and the
notebooks' own layout (one parameters cell, no outputs, Summary and Exercises)."""

import ast
import subprocess
import sys
from pathlib import Path

import ipywidgets
import nbformat
import pytest
import torch
from PIL import Image

from ddpm_core.notebooks import NotebookFailed, notebook_paths, parse_value, run_notebooks
from ddpm_core.plotting import plot_image_table, plot_pixel_histogram, plot_timestep_embedding, save_gif
from ddpm_core.widgets import figure_controls, figure_slider


def write_notebook(path, *sources, parameters="value = 1  # a parameter"):
    cells = [nbformat.v4.new_code_cell(parameters)] + [nbformat.v4.new_code_cell(s) for s in sources]
    cells[0].metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def test_parameter_values_parse_as_python_literals():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("None") is None and parse_value("laptop") == "laptop" and parse_value("'x'") == "x"
    assert parse_value("../data") == "../data"


def test_numbered_notebooks_in_order_and_a_clear_error_without_any(tmp_path):
    for name in ("02_b.ipynb", "01_a.ipynb", "scratch.ipynb"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in notebook_paths(tmp_path)] == ["01_a.ipynb", "02_b.ipynb"]
    with pytest.raises(FileNotFoundError, match="no numbered notebooks"):
        notebook_paths(tmp_path / "empty")


def test_the_batch_injects_parameters_runs_in_order_and_stops_at_the_failure(tmp_path):
    folder, out = tmp_path / "nb", tmp_path / "out"
    folder.mkdir()
    write_notebook(folder / "01_ok.ipynb", "from pathlib import Path\nPath('ran.txt').write_text(str(value))")
    write_notebook(folder / "02_fails.ipynb", "raise ValueError(f'unknown profile {value!r}')")
    write_notebook(folder / "03_never.ipynb", "Path('never.txt').write_text('x')")
    with pytest.raises(NotebookFailed, match=r"02_fails.ipynb failed .*ValueError: unknown profile 7"):
        run_notebooks(folder, out, {"value": 7})
    assert (folder / "ran.txt").read_text() == "7"  # run with the notebook's folder as working directory
    assert (out / "01_ok.ipynb").exists() and not (folder / "never.txt").exists()
    prepared = run_notebooks(folder, tmp_path / "prepared", {"value": 8}, prepare_only=True)
    assert [r["notebook"] for r in prepared] == ["01_ok.ipynb", "02_fails.ipynb", "03_never.ipynb"]
    injected = nbformat.read(tmp_path / "prepared" / "01_ok.ipynb", as_version=4).cells[1]
    assert "injected-parameters" in injected.metadata["tags"] and "value = 8" in injected.source


def test_the_slider_draws_its_initial_value_then_follows_the_slider():
    drawn = []

    def draw(k):
        drawn.append(k)
        return f"figure {k}"

    widget = figure_slider(draw, [0, 10, 20], description="t", value=10)
    slider = widget.children[0].children[0]
    assert list(slider.options) == [0, 10, 20] and drawn == [10]
    slider.value = 20
    assert drawn == [10, 20]
    with pytest.raises(ValueError, match="not one of"):
        figure_slider(draw, [0, 10], value=5)


def test_controls_redraw_with_every_value_they_hold():
    drawn = []

    def draw(digit, scale):
        drawn.append((digit, scale))
        return f"figure {digit} {scale}"

    digit = ipywidgets.Dropdown(options=list(range(10)), value=3)
    scale = ipywidgets.SelectionSlider(options=[0, 1, 5], value=1)
    widget = figure_controls(draw, digit=digit, scale=scale)
    assert list(widget.children[0].children) == [digit, scale] and drawn == [(3, 1)]
    digit.value = 7
    scale.value = 5
    assert drawn == [(3, 1), (7, 1), (7, 5)]
    with pytest.raises(ValueError, match="at least one control"):
        figure_controls(draw)


def test_figures_have_one_panel_per_image_and_the_gif_one_frame_per_step(tmp_path):
    fig = plot_image_table(torch.zeros(3, 5, 1, 8, 8), [str(k) for k in range(5)], ["a", "b", "c"])
    assert len(fig.axes) == 15 and fig.axes[0].get_title() == "0" and fig.axes[5].get_ylabel() == "b"
    assert len(plot_pixel_histogram(torch.randn(4, 1, 8, 8), "x").axes) == 2
    assert len(plot_timestep_embedding(torch.zeros(10, 16), torch.arange(10)).axes) == 2  # image and colour bar
    frames = torch.linspace(-1, 1, 6).view(6, 1, 1, 1, 1).expand(6, 4, 1, 8, 8)  # (K, B, C, H, W)
    path = save_gif(frames, tmp_path / "chain.gif", nrow=2, frame_ms=50, hold_last_ms=500)
    with Image.open(path) as gif:
        assert gif.n_frames == 6 and gif.info["duration"] == 50
        gif.seek(5)
        assert gif.info["duration"] == 500


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_notebook_follows_the_house_layout(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    for line in tagged[0].source.splitlines():  # literal assignments, each with a comment
        target, value = line.split("#")[0].split("=", 1)
        assert target.strip().isidentifier() and "#" in line
        ast.literal_eval(value.strip())
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert markdown.startswith("# ") and "What you will learn" in markdown
    assert "## Summary" in markdown and "## Exercises" in markdown
    assert "/work/" not in path.read_text() and "shared/data" not in path.read_text()


def test_the_notebooks_command_reports_a_missing_folder_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ddpm_core", "notebooks", "--notebooks", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no numbered notebooks" in result.stderr and "Traceback" not in result.stderr
