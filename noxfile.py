"""nox sessions: the same checks on the current environment and across library releases.

One private implementation (`_pytest`), thin public sessions. Versions are printed
before pytest runs so every log says what it tested.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# On the CPU machines pip finds this torch build on local disk; a bare "torch" would
# resolve to a multi-gigabyte CUDA build.
CPU_TORCH = "torch==2.13.0"
PYTEST_ARGS = ("--strict-markers", "--strict-config", "-ra")
PRINT_VERSIONS = ("import sys, torch, transformers, peft; print('python', sys.version.split()[0], '| torch', "
                  "torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, "
                  "'| cuda', torch.cuda.is_available())")


def _install(session: nox.Session, *extra: str) -> None:
    session.install(CPU_TORCH)
    session.install(*extra, "-e", ".[test]")


def _pytest(session: nox.Session, *args: str) -> None:
    session.run("python", "-c", PRINT_VERSIONS)
    session.run("python", "-m", "pytest", *PYTEST_ARGS, *args, *session.posargs)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The default CPU test suite on the newest releases."""
    _install(session)
    _pytest(session)


@nox.session(python="3.11")
def stability(session: nox.Session) -> None:
    """Numerical-stability tests only (`pytest -m stability`)."""
    _install(session)
    _pytest(session, "-m", "stability")


@nox.session(venv_backend="none")
def gpu_tests(session: nox.Session) -> None:
    """GPU tests in the machine's existing environment: GPU machines have CUDA torch,
    transformers and peft preinstalled and no network, so nothing is created or downloaded."""
    session.env["PYTHONPATH"] = "src"
    _pytest(session, "-m", "gpu")
