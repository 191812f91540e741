"""Developer sessions: `nox -s tests`, `nox -s slow`, `nox -s lint`, `nox -s docs`, `nox -s build`, `nox -s demo`,
`nox -s bench`.

Every session installs the CPU build of torch pinned below first: an unpinned torch resolves to a multi-GB CUDA build.
"""

import re
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "demo"]
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
TORCH = "torch==2.13.0"


def _project_version() -> str:
    """The `version` of pyproject.toml's [project] table (its first `version =` line)."""
    match = re.search(r'^version = "([^"]+)"$', Path("pyproject.toml").read_text(encoding="utf-8"), flags=re.MULTILINE)
    if match is None:
        raise RuntimeError('pyproject.toml has no `version = "..."` line')
    return match[1]


def _install(session: nox.Session, extras: str = "") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (unit, doctests, 2-process gloo) on both cores, without the tests marked slow."""
    _install(session, "test")
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """The tests marked slow, which the default run skips: a million updates, 3-process and resume-on-2-ranks runs."""
    _install(session, "test")
    session.run("python", "-m", "pytest", "-n", "2", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff (lint and format) and mypy --strict on the package (with matplotlib, which plot() imports)."""
    _install(session, "lint,plot")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README's main job: train a small SAE on synthetic data, printing per-epoch metrics."""
    _install(session)
    session.run("python", "examples/train_sae.py", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Speed targets as ratios to hand-written code, measured side by side (pass --quick for a smoke run)."""
    _install(session)
    session.run("python", "benchmarks/bench_loss.py", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/; --strict turns every warning (a broken reference) into a failure."""
    _install(session, "docs")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build the sdist and the wheel, install the wheel alone into this fresh virtualenv and smoke-test it."""
    session.install("build")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    (wheel,) = dist.glob("sparse_metrics-*.whl")
    session.install(TORCH)
    session.install(str(wheel))
    version = _project_version()
    # Run from outside the source tree, so that `import sparse_metrics` finds the installed wheel.
    smoke = Path("tests/smoke_wheel.py").resolve()
    session.chdir(dist)
    session.run("python", str(smoke), version)
