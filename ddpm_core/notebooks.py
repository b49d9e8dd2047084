"""The numbered notebooks as a batch: each executed headless by papermill, in order, with the
same parameters, into an output folder; the first failure stops the batch with its name.

This module owns finding and running the notebooks; what they teach is in `notebooks/`.
"""

from __future__ import annotations

import ast
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class NotebookFailed(RuntimeError):
    """A notebook of the batch raised; the message names it and the error."""


def notebook_paths(folder: str | Path) -> list[Path]:
    """The numbered notebooks (`01_*.ipynb`, `02_*.ipynb`, ...) of `folder`, in order."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (01_*.ipynb, ...) in {folder.resolve()}; "
                                f"run from the project folder or pass --notebooks")
    return paths


def parse_value(text: str):
    """A command-line parameter value as the Python literal it spells (3, 0.5, True, None,
    'x'), else the plain string: `-p seed 3` gives 3, `-p profile laptop` gives 'laptop'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_notebooks(folder: str | Path, out: str | Path, parameters: dict, prepare_only: bool = False,
                  progress: bool = False) -> list[dict]:
    """Execute every numbered notebook of `folder` with `parameters` injected after its
    `parameters` cell, writing the executed copies to `out`. Each runs with its own folder as
    the working directory, so the notebooks' relative paths (../data, ../figures) hold.
    `prepare_only` writes the parameterised copies without running them (for nbval).
    Returns [{"notebook", "seconds"}]; raises NotebookFailed on the first error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    for path in notebook_paths(folder):
        start = time.perf_counter()
        log.info("running %s", path.name)
        try:
            papermill.execute_notebook(str(path), str(out / path.name), parameters=parameters,
                                       cwd=str(path.parent), prepare_only=prepare_only,
                                       progress_bar=progress, kernel_name="python3")
        except PapermillExecutionError as error:
            raise NotebookFailed(f"{path.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue} "
                                 f"(the executed copy is {out / path.name})") from error
        report.append({"notebook": path.name, "seconds": round(time.perf_counter() - start, 1)})
    return report
