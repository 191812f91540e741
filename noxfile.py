"""Developer sessions: `nox -s tests`, `nox -s slow`, `nox -s lint`, `nox -s demo`, `nox -s bench`.

Every session installs the CPU build of torch pinned below first: an unpinned torch resolves to a multi-GB CUDA build.
"""

import nox

nox.options.sessions = ["lint", "tests", "demo"]
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
TORCH = "torch==2.13.0"


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
    """Ruff (lint and format) and mypy --strict on the package."""
    _install(session, "lint")
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
