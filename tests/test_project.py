"""The project's own set-up: the README's module table matches the package, CI runs the
Makefile's `test` target, conda and pip name the same packages, and no dependency is pinned."""

import os
import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_module_table() -> list[str]:
    """The `name.py` files named in the first column of README.md's `| module | owns |` table."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*module\s*\|\s*owns\s*\|", line))
    names = []
    for line in lines[start + 2:]:  # past the header and the | --- | row
        if not line.startswith("|"):
            break
        names += re.findall(r"`(\w+\.py)`", line.split("|")[1])
    return names


def test_the_readme_module_table_lists_every_module_once():
    modules = sorted(p.name for p in (ROOT / "ddpm_core").glob("*.py") if not p.name.startswith("__"))
    listed = readme_module_table()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    missing, stale = sorted(set(modules) - set(listed)), sorted(set(listed) - set(modules))
    assert not missing and not stale, f"README's module table lacks {missing}; names modules that are gone: {stale}"


def fake_make(tmp_path: Path, status: int) -> dict:
    """An environment whose `make` records its folder and arguments, then exits with `status`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    make = bin_dir / "make"
    make.write_text(f'#!/bin/sh\nprintf "%s\\n" "$PWD" "$@" > "{tmp_path}/make.args"\nexit {status}\n')
    make.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_ci_runs_the_makefile_test_target_and_fails_when_it_fails(tmp_path):
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], cwd=tmp_path, env=fake_make(tmp_path, 0),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "make.args").read_text().splitlines() == [str(ROOT), "test"]  # from the root, wherever called
    failed = subprocess.run(["bash", str(ROOT / ".ci" / "run")], cwd=tmp_path, env=fake_make(tmp_path, 3),
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0

    makefile = (ROOT / "Makefile").read_text()
    targets = dict(re.findall(r"^([\w-]+):[ \t]*([^=\n]*)$", makefile, flags=re.M))
    assert {"test-unit", "test-notebooks", "test-browser"} <= set(targets["test"].split())
    recipe = makefile.split("\ntest-unit:")[1].split("\n\n")[0]
    assert "-m pytest" in recipe  # the unit suite, with pyproject's addopts


def pip_requirements_of_environment_yml() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    found = set()
    for line in lines[start + 1 :]:
        match = re.match(r"^\s+- (\S.*)$", line)
        if match and not match.group(1).startswith("-e"):
            found.add(match.group(1).strip())
    return found


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    from_pyproject = set(project["dependencies"]) | set(extras["test"]) | set(extras["lab"])
    from_pyproject -= {f"{project['name']}[lab]"}  # the test extra names the lab extra
    assert pip_requirements_of_environment_yml() == from_pyproject
    python = project["requires-python"].removeprefix(">=")
    conda_python = re.search(r"^\s+- python=(\d+\.\d+)\s*$", (ROOT / "environment.yml").read_text(), flags=re.M)
    assert conda_python, "environment.yml pins no python=X.Y"
    assert tuple(map(int, conda_python.group(1).split("."))) >= tuple(map(int, python.split(".")))


def test_every_dependency_is_a_range_with_a_lower_bound():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        if requirement.startswith(project["name"]):
            continue  # an extra of this project
        assert re.fullmatch(r"[\w.-]+(\[[\w,]+\])?>=[\d.]+(,<[\d.]+)?", requirement), \
            f"{requirement!r}: a lower bound (>=), not a pin, so that the user's CUDA build of torch fits"
