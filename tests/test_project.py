"""The project's own set-up: conda and pip name the same packages; CI runs the README's command."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in ci and "set -euo pipefail" in ci


def test_torch_is_a_range_not_a_pin():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.2" in deps and "torchvision>=0.17" in deps
