"""The numbered notebooks as a batch: each executed headless by papermill, in order, into an
output folder; the first failure stops the batch with its name. Before the first one starts,
every parameter given is checked against the notebooks' `parameters` cells (its name, its type,
its range or choices), and each notebook is passed only the parameters its cell declares.

This module owns finding, checking and running the notebooks; what they teach is in `notebooks/`.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import functools
import io
import logging
import math
import os
import re
import shlex
import sys
import time
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from ddpm_core.config import MetricName, ScheduleName
from ddpm_core.config import DatasetName
from ddpm_core.profiles import PROFILES
from ddpm_core.runs import resolve_parameters
from ddpm_core.runtime import PROGRESS_ENV, resolve_device

log = logging.getLogger(__name__)


class NotebookFailed(RuntimeError):
    """A notebook of the batch raised; the message names it and the error."""


@dataclass(frozen=True)
class Bounds:
    """The numbers a parameter may take: low <= value <= high (None: unbounded on that side);
    with `zero_is_auto`, 0 as well (the notebooks' "0: the profile's choice")."""

    low: float | None = None
    high: float | None = None
    zero_is_auto: bool = False

    def __contains__(self, value: float) -> bool:
        if self.zero_is_auto and value == 0:
            return True
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"from {self.low} to {self.high}"
        else:
            text = f"at least {self.low}" if self.low is not None else f"at most {self.high}"
        return f"0 (automatic) or {text}" if self.zero_is_auto else text


# Every int parameter of the notebooks is a count, a step number, a class or a seed: none can be
# negative (COUNTS), and these have tighter ranges. Floats are unbounded unless listed here.
COUNTS = Bounds(0)
BOUNDS = {
    "seed": Bounds(0, 2**32 - 1),  # NumPy's seed range (torch's is wider)
    "digit": Bounds(0, 9),  # a class of MNIST or CIFAR-10
    "num_samples": Bounds(1),
    "compare_samples": Bounds(1),
    "sampler_steps": Bounds(1),
    "fid_samples": Bounds(2, zero_is_auto=True),  # FID needs two samples for a covariance
    "nll_images": Bounds(1, zero_is_auto=True),
    "guidance_scale": Bounds(0),
}
# The string parameters whose help comment lists a fixed set. `device` ("cuda:1" too) is checked
# by runtime.resolve_device, which also asks whether that device is here.
CHOICES = {
    "profile": ("auto", *PROFILES),
    "dataset": get_args(DatasetName),
    "schedule": get_args(ScheduleName),
    "metric": ("auto", *get_args(MetricName)),
    "free_guidance": ("auto",),
    "ddpm_rows": ("auto",),
    "ablation": ("auto",),
}
# What nobody sees in a headless batch, so it runs only when asked for: notebook 02's live view
# of its training (`-p watch True` draws it anyway; `make test` does, to test it).
HEADLESS = {"watch": False}
# What the notebooks' setup cells pass to runs.resolve_notebook, in its order: checked together here.
SETUP = ("profile", "dataset", "schedule", "attention", "device")
# The types an annotation may name. papermill 2.7 reads `name: type = value` only when the type is
# words, brackets and commas, so a union is written as a string in typing's spelling
# (`dataset: "Optional[str]" = "mnist"`), which also needs no import when the cell runs.
TYPES = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}
TYPE_WORDS = {bool: ("True", "False"), int: ("an int",), float: ("a number",), str: ("a string",), type(None): ("None",)}


@dataclass(frozen=True)
class NotebookParameter:
    """One line of a `parameters` cell: `name: type = default  # help`."""

    name: str
    default: object
    types: tuple[type, ...]
    help: str


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
    'x'), else the plain string: `-p seed 3` gives 3, `-p profile laptop` gives 'laptop'.
    Whether it suits the parameter is `validate_parameters`' question."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def read_parameters(path: str | Path) -> dict[str, NotebookParameter]:
    """The parameters a notebook declares, read from its one `parameters` cell with `ast` (the
    cell is not run): name -> default, type (the annotation's, else the default's) and help."""
    path = Path(path)
    import nbformat  # its JSON-schema validator takes seconds to import: only when notebooks are read

    cells = [c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name} has {len(cells)} cells tagged parameters; it needs exactly one")
    source = cells[0].source
    try:
        body = ast.parse(source).body
    except SyntaxError as error:
        raise ValueError(f"{path.name}: the parameters cell is not Python ({error.msg}, line {error.lineno})") from None
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    parameters = {}
    for node in body:
        parameter = _read_assignment(node, comments.get(node.end_lineno, ""), f"{path.name}, parameters line {node.lineno}")
        parameters[parameter.name] = parameter
    return parameters


def _read_assignment(node: ast.stmt, help_text: str, where: str) -> NotebookParameter:
    """`name = literal` or `name: type = literal`, as a NotebookParameter; else a ValueError."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        name, annotation = node.targets[0].id, None
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        name, annotation = node.target.id, node.annotation
    else:
        raise ValueError(f"{where}: not a literal assignment `name = value  # help`")
    try:
        default = ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError):
        raise ValueError(f"{where}: the default of {name} is not a literal") from None
    if annotation is None and default is None:
        raise ValueError(f"{where}: {name} = None says nothing of its type; annotate it, e.g. "
                         f"{name}: \"Optional[str]\" = None")
    types = _annotation_types(annotation, where) if annotation is not None else (type(default),)
    if not _has_type(default, types):
        raise ValueError(f"{where}: the default {default!r} of {name} is not of its annotated type")
    return NotebookParameter(name, default, types, help_text)


def _annotation_types(node: ast.expr, where: str) -> tuple[type, ...]:
    """The types an annotation names: `int`, `str | None`, `"Optional[str]"`, `"Union[bool, str]"`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        try:
            return _annotation_types(ast.parse(node.value, mode="eval").body, where)
        except SyntaxError:
            pass
    elif isinstance(node, ast.Constant) and node.value is None:
        return (type(None),)
    elif isinstance(node, ast.Name) and node.id in TYPES:
        return (TYPES[node.id],)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return tuple(dict.fromkeys(_annotation_types(node.left, where) + _annotation_types(node.right, where)))
    elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("Optional", "Union"):
        members = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        types = tuple(t for member in members for t in _annotation_types(member, where))
        return tuple(dict.fromkeys(types + ((type(None),) if node.value.id == "Optional" else ())))
    raise ValueError(f"{where}: cannot read the annotation {ast.unparse(node)!r}; "
                     f"use bool, int, float, str, None, Optional[...] or Union[...]")


def _has_type(value, types: tuple[type, ...]) -> bool:
    """Whether `value` is one of `types`; an int is not a bool (nor a bool an int), a float takes ints."""
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int):
        return int in types or float in types
    return type(value) in types


def spell(value) -> str:
    """`value` as one would type it after `-p NAME` (what `parse_value` reads back as `value`)."""
    text = value if isinstance(value, str) and parse_value(value) == value else repr(value)
    if re.fullmatch(r"[\w@%+=:,./-]+", text):
        return text
    return f'"{text}"' if not re.search(r'["$`\\!]', text) else shlex.quote(text)  # "'3'" reads best


def _one_of(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _conform(parameter: NotebookParameter, value):
    """`value` checked against the parameter's type, range and choices; an int is passed as a
    float where only a float is declared. A ValueError in one line says what to pass instead."""
    name, types = parameter.name, parameter.types
    example = f"e.g. -p {name} {spell(parameter.default)}"
    if not _has_type(value, types):
        quote = (f" (text that reads as a number or keyword needs Python's quotes too: -p {name} {spell(str(value))})"
                 if str in types and isinstance(value, (int, float, type(None))) else "")
        words = [word for t in types for word in TYPE_WORDS[t]]
        raise ValueError(f"notebook parameter {name} must be {_one_of(words)}, "
                         f"{example}; got {value!r}{quote}")
    if isinstance(value, int) and not isinstance(value, bool) and int not in types:
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"notebook parameter {name} must be a finite number, {example}; got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds = BOUNDS.get(name, COUNTS if isinstance(value, int) else Bounds())
        if value not in bounds:
            raise ValueError(f"notebook parameter {name} must be {bounds}, {example}; got {value!r}")
    if isinstance(value, str) and name in CHOICES and value not in CHOICES[name]:
        valid = ([repr(True), repr(False)] if bool in types else []) + list(CHOICES[name])
        valid += ["None"] if type(None) in types else []
        close = difflib.get_close_matches(value, CHOICES[name], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown {name} {value!r}{hint}; valid choices: {', '.join(valid)}")
    return value


def validate_parameters(paths: list[str | Path], parameters: dict, defaults: dict | None = None) -> dict[Path, dict]:
    """Check `parameters` against the notebooks' `parameters` cells before anything runs:
    every name must be declared by some notebook, every value must suit its declaration, and
    profile, dataset, schedule, attention and device must resolve together as the notebooks'
    setup resolves them (runs.resolve_parameters). Raises a one-line ValueError on the first
    problem. Returns, for each notebook, the parameters it declares (values as conformed), plus
    those of `defaults` it declares and `parameters` does not give (e.g. `HEADLESS`)."""
    declared = {Path(p): read_parameters(p) for p in paths}
    known = sorted({name for names in declared.values() for name in names})
    unknown = [name for name in parameters if name not in known]
    if unknown:
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            named.append(f"{name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ValueError(f"unknown notebook parameter{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
                         f"the notebooks' parameters are: {', '.join(known)}")
    subsets, resolved = {}, set()
    for path, declaration in declared.items():
        given = {**{k: v for k, v in (defaults or {}).items() if k in declaration}, **parameters}
        subset = {name: _conform(declaration[name], value) for name, value in given.items() if name in declaration}
        values = {**{name: p.default for name, p in declaration.items()}, **subset}
        if all(name in values for name in SETUP):
            setup = tuple(values[name] for name in SETUP)
            if setup not in resolved:  # the notebooks' own first check, made before any of them runs
                resolve_parameters(*setup)
                resolved.add(setup)
        elif "device" in values:
            resolve_device(values["device"])
        subsets[path] = subset
    return subsets


def run_notebooks(folder: str | Path, out: str | Path, parameters: dict, prepare_only: bool = False,
                  progress: bool = False) -> list[dict]:
    """Execute every numbered notebook of `folder` with its share of `parameters` (those its
    `parameters` cell declares, checked first by `validate_parameters`) injected after that
    cell, writing the executed copies to `out`. Each runs with its own folder as the working
    directory, so the notebooks' relative paths (../data, ../figures) hold.
    `prepare_only` writes the parameterised copies without running them (for nbval). What
    `HEADLESS` lists is passed too, to the notebooks that declare it, unless given.
    Returns [{"notebook", "seconds"}]; raises NotebookFailed on the first error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    paths = notebook_paths(folder)
    subsets = validate_parameters(paths, parameters, defaults=HEADLESS)  # before anything is written or run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    for number, path in enumerate(paths, 1):
        start = time.perf_counter()
        log.info("running %s", path.name)
        if progress and not prepare_only:
            print(f"[notebook {number}/{len(paths)}] {path.name}", file=sys.stderr, flush=True)
        try:
            with kernel_progress(progress):
                papermill.execute_notebook(
                    str(path), str(out / path.name), parameters=subsets[path], cwd=str(path.parent),
                    prepare_only=prepare_only, progress_bar=False, kernel_name="python3",
                    stdout_file=sys.stderr if progress else None, stderr_file=sys.stderr if progress else None,
                    kernel_manager_class=kernel_manager_class())
        except PapermillExecutionError as error:
            raise NotebookFailed(f"{path.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue} "
                                 f"(the executed copy is {out / path.name})") from error
        seconds = round(time.perf_counter() - start, 1)
        if progress and not prepare_only:
            print(f"[notebook {number}/{len(paths)}] {path.name} done in {seconds / 60:.1f} min", file=sys.stderr,
                  flush=True)
        report.append({"notebook": path.name, "seconds": seconds})
    return report


@contextlib.contextmanager
def kernel_progress(progress: bool) -> Iterator[None]:
    """With `progress`, the kernels started meanwhile draw plain-text bars (runtime.PROGRESS_ENV),
    which the batch streams to its stderr with the cells' own output (stdout keeps the
    command's report): which model trains, how many steps, the rate and the time left, where a
    widget would show nothing headless."""
    previous = os.environ.get(PROGRESS_ENV)
    if progress:
        os.environ[PROGRESS_ENV] = "text"
    try:
        yield
    finally:
        if progress:
            if previous is None:
                os.environ.pop(PROGRESS_ENV)
            else:
                os.environ[PROGRESS_ENV] = previous


@functools.cache
def kernel_manager_class() -> type:
    """nbclient's kernel manager, over local sockets (IPC) where the system has them: a kernel
    that listens on TCP warns, in every notebook, that it runs without encryption; one on IPC
    opens no port at all. Windows has no IPC transport and keeps TCP."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    if os.name != "posix":
        return AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return LocalKernelManager
