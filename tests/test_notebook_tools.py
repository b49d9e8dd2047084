"""What the notebooks stand on: the papermill batch runner, the slider, the figures, and the
notebooks' own layout (one parameters cell, no outputs, Summary and Exercises)."""

import ast
import logging
import os
import re
from pathlib import Path

import ipywidgets
import nbformat
import pytest
import torch
from PIL import Image

from conftest import run_main
from ddpm_core.notebooks import (HEADLESS, NotebookFailed, notebook_paths, parse_value, read_parameters, run_notebooks,
                                 validate_parameters)
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
    assert parse_value("abc") == "abc" and parse_value("{[1]: 2}") == "{[1]: 2}"  # not a literal: the text


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


def test_a_headless_batch_streams_text_bars_names_each_notebook_and_has_no_kernel_warning(tmp_path, capfd):
    folder = tmp_path / "nb"
    folder.mkdir()
    write_notebook(folder / "01_bar.ipynb", "import os\nfrom ddpm_core.runtime import progress_bar\n"
                   "print('bars:', os.environ.get('DDPM_PROGRESS'))\n"
                   "for _ in progress_bar(range(3), desc='training demo'):\n    pass")
    run_notebooks(folder, tmp_path / "out", {}, progress=True)
    out, err = capfd.readouterr()
    assert "[notebook 1/1] 01_bar.ipynb" in err and "01_bar.ipynb done in" in err
    assert "training demo: 100%" in err and "3/3" in err  # a text bar, streamed from the kernel
    assert "bars: text" in err and out == ""  # stdout is left to the command's report
    assert "without encryption" not in err + out  # the kernel listens on local sockets, not TCP
    assert "DDPM_PROGRESS" not in os.environ  # set for the batch's kernels only
    executed = nbformat.read(tmp_path / "out" / "01_bar.ipynb", as_version=4).cells[1]
    assert any("training demo" in output.get("text", "") for output in executed.outputs)
    run_notebooks(folder, tmp_path / "quiet", {})
    out, err = capfd.readouterr()
    assert "bars" not in out and "[notebook" not in err  # without progress: nothing streamed


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
    parameters = read_parameters(path)  # literal assignments (refused otherwise), each with a comment
    assert len(parameters) == len(tagged[0].source.splitlines()) and all(p.help for p in parameters.values())
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert markdown.startswith("# ") and "What you will learn" in markdown
    assert "## Summary" in markdown and "## Exercises" in markdown
    at = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "markdown" and c.source.startswith("## Setup"))
    imports, setup = notebook.cells[at + 1].source.splitlines(), notebook.cells[at + 2].source.splitlines()
    assert all(line.startswith(("import ", "from ", "%")) or not line.strip() for line in imports), "imports first"
    assert len(setup) <= 16, f"the setup cell has {len(setup)} lines: at most ~15, the rest belongs in the library"
    assert "/work/" not in path.read_text() and "shared/data" not in path.read_text()


def test_the_notebooks_command_reports_a_missing_folder_in_one_line(tmp_path, capsys, fixed_threads):
    code, _, err = run_main(capsys, "notebooks", "--notebooks", tmp_path, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ddpm notebooks: error: ") and "no numbered notebooks" in err and str(tmp_path) in err
    assert list(tmp_path.iterdir()) == []  # nothing written


ROOT = Path(__file__).resolve().parents[1]


def smoke_parameters(smoke: Path) -> dict:
    """What `make test-notebooks` passes: --profile smoke and the Makefile's -p pairs."""
    recipe = (ROOT / "Makefile").read_text().split("\ntest-notebooks:")[1].split("\n\n")[0]
    command = next(line for line in recipe.replace("\\\n", " ").splitlines() if "-m ddpm_core notebooks" in line)
    pairs = re.findall(r"-p (\S+) (\S+)", command)
    assert len(pairs) >= 8, "the Makefile's test-notebooks recipe moved"
    parameters = {"profile": "smoke", "device": "auto"}
    parameters.update({name: parse_value(value.replace("$(SMOKE)", str(smoke))) for name, value in pairs})
    return parameters


def test_the_parameters_cell_is_read_without_running_it(tmp_path):
    cell = ("seed = 0  # seeds everything\n"
            "dataset: \"Optional[str]\" = \"mnist\"  # mnist or cifar10 (None: the profile's)\n"
            "scale: float = 1  # a float takes an int\n"
            "mode: bool | str = \"auto\"  # True, False or auto\n"
            "name = \"a # b\"  # the help, not the hash in the string")
    write_notebook(tmp_path / "01_a.ipynb", parameters=cell)
    read = read_parameters(tmp_path / "01_a.ipynb")
    assert list(read) == ["seed", "dataset", "scale", "mode", "name"]
    assert read["seed"].types == (int,) and read["seed"].default == 0 and read["seed"].help == "seeds everything"
    assert read["dataset"].types == (str, type(None)) and read["mode"].types == (bool, str)
    assert read["scale"].types == (float,) and read["name"].default == "a # b"
    assert read["name"].help == "the help, not the hash in the string"
    for bad, says in [("x = len('a')  # derived", "not a literal"), ("x = None  # what type?", "annotate it"),
                      ("x: int = 'a'  # wrong", "not of its annotated type"), ("x: list = []  # ?", "cannot read"),
                      ("x, y = 1, 2  # two", "not a literal assignment")]:
        write_notebook(tmp_path / "02_bad.ipynb", parameters=bad)
        with pytest.raises(ValueError, match=says) as error:
            read_parameters(tmp_path / "02_bad.ipynb")
        assert "02_bad.ipynb, parameters line 1" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_the_same_parameters_as_the_runner(path):
    import papermill

    seen = papermill.inspect_notebook(path)  # its own parser: a `bool | str` annotation would hide a line
    read = read_parameters(path)
    assert list(seen) == list(read)
    assert {name: p["help"] for name, p in seen.items()} == {name: p.help for name, p in read.items()}
    assert {name: ast.literal_eval(p["default"]) for name, p in seen.items()} == {n: p.default for n, p in read.items()}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_default_passes_its_own_checks(path):
    defaults = {name: p.default for name, p in read_parameters(path).items()}
    assert validate_parameters([path], defaults) == {path: defaults}


BAD = [  # (-p NAME VALUE as the command line parses it, what the one-line message must say)
    ({"shedule": "cosine"}, ["unknown notebook parameter 'shedule' (did you mean schedule?)", "num_samples, profile"]),
    ({"sed": 1, "zzz": 2}, ["parameters 'sed' (did you mean seed?), 'zzz'; the notebooks' parameters are: "]),
    ({"seed": parse_value("abc")}, ["seed must be an int, e.g. -p seed 0; got 'abc'"]),
    ({"seed": True}, ["seed must be an int"]),
    ({"seed": -1}, ["seed must be from 0 to 4294967295", "got -1"]),
    ({"attention": parse_value("maybe")}, ["attention must be True or False, e.g. -p attention True; got 'maybe'"]),
    ({"num_samples": 1.5}, ["num_samples must be an int, e.g. -p num_samples 64; got 1.5"]),
    ({"num_samples": -3}, ["num_samples must be at least 1", "got -3"]),
    ({"compare_steps": -1}, ["compare_steps must be at least 0"]),
    ({"digit": 10}, ["digit must be from 0 to 9"]),
    ({"fid_samples": 1}, ["fid_samples must be 0 (automatic) or at least 2"]),
    ({"guidance_scale": -0.5}, ["guidance_scale must be at least 0"]),
    ({"guidance_scale": float("inf")}, ["guidance_scale must be a finite number"]),
    ({"guidance_scale": "high"}, ["guidance_scale must be a number, e.g. -p guidance_scale 5.0"]),
    ({"data_root": 3}, ["data_root must be a string", "got 3", "quotes too: -p data_root \"'3'\""]),
    ({"profile": "lapto"}, ["unknown profile 'lapto' (did you mean laptop?); valid choices: auto, smoke, laptop"]),
    ({"dataset": "mnsit"}, ["unknown dataset 'mnsit' (did you mean mnist?); valid choices: mnist, cifar10, folder, None"]),
    ({"schedule": "cosin"}, ["unknown schedule 'cosin' (did you mean cosine?); valid choices: linear, cosine"]),
    ({"device": "gpu"}, ["unknown device 'gpu'; valid choices: auto, cpu, cuda, mps"]),
    ({"metric": "fid"}, ["unknown metric 'fid'; valid choices: auto, inception, mnist"]),
    ({"free_guidance": "maybe"}, ["unknown free_guidance 'maybe'; valid choices: True, False, auto"]),
    ({"ddpm_rows": "yes"}, ["unknown ddpm_rows 'yes'; valid choices: True, False, auto"]),
    ({"profile": "smoke", "dataset": "cifar10"}, ["profile 'smoke' builds a 28x28 model", "profiles for cifar10"]),
]


@pytest.mark.parametrize("parameters, says", BAD,
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_a_bad_parameter_is_refused_in_one_line_before_anything_runs(parameters, says):
    with pytest.raises(ValueError) as error:
        validate_parameters(NOTEBOOKS, {"profile": "auto", "device": "auto", **parameters})
    message = str(error.value)
    assert "\n" not in message
    for part in says:
        assert part in message


def test_values_that_fit_are_passed_to_the_notebooks_that_declare_them(tmp_path):
    parameters = smoke_parameters(tmp_path)
    subsets = validate_parameters(NOTEBOOKS, parameters)
    for path in NOTEBOOKS:
        declared = read_parameters(path)
        assert subsets[path] == {k: v for k, v in parameters.items() if k in declared}
    names = {path.name[:2]: set(subset) for path, subset in subsets.items()}
    assert "num_samples" in names["03"] and "num_samples" not in names["04"] | names["01"]
    assert "fid_samples" in names["05"] and names["01"] == {"profile", "device", "data_root", "runs_root", "figures_dir"}
    more = validate_parameters(NOTEBOOKS, {"guidance_scale": 2, "free_guidance": True, "dataset": None, "fid_samples": 0})
    guided = more[NOTEBOOKS[3]]
    assert guided["guidance_scale"] == 2.0 and isinstance(guided["guidance_scale"], float)  # a float takes an int
    assert guided["free_guidance"] is True and guided["dataset"] is None and more[NOTEBOOKS[4]]["fid_samples"] == 0


def test_prepared_notebooks_hold_their_own_parameters_after_the_annotated_cell(tmp_path, caplog):
    parameters = smoke_parameters(tmp_path)
    assert parameters.pop("watch") is True  # make test draws notebook 02's live view, to test it
    with caplog.at_level(logging.WARNING, logger="papermill"):
        run_notebooks(ROOT / "notebooks", tmp_path / "prepared", parameters, prepare_only=True)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("papermill")]  # "Passed unknown parameter"
    for path in NOTEBOOKS:
        cells = nbformat.read(tmp_path / "prepared" / path.name, as_version=4).cells
        at = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
        assert "injected-parameters" in cells[at + 1].metadata["tags"]
        namespace = {}
        exec(cells[at].source, namespace)  # the annotations evaluate with builtins only
        defaults = {name: namespace[name] for name in read_parameters(path)}
        exec(cells[at + 1].source, namespace)
        given = {k: v for k, v in {**HEADLESS, **parameters}.items() if k in defaults}  # headless: no live view
        assert {name: namespace[name] for name in defaults} == {**defaults, **given}
        assert ("watch" in defaults) == path.name.startswith("02") and namespace.get("watch") in (None, False)
    run_notebooks(ROOT / "notebooks", tmp_path / "watched", {**parameters, "watch": True}, prepare_only=True)
    cells = nbformat.read(tmp_path / "watched" / NOTEBOOKS[1].name, as_version=4).cells
    assert "watch = True" in next(c.source for c in cells if "injected-parameters" in c.metadata.get("tags", []))


def test_the_command_line_refuses_a_misspelt_parameter_in_one_line(tmp_path, monkeypatch, capsys, fixed_threads):
    monkeypatch.chdir(ROOT)
    code, _, err = run_main(capsys, "notebooks", "--prepare-only", "--out", tmp_path / "out", "-p", "shedule", "cosine")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ddpm notebooks: error: unknown notebook parameter 'shedule' (did you mean schedule?)")
    assert list(tmp_path.iterdir()) == []  # nothing written
