"""nox sessions: the same checks on the current environment and across library releases.

One private implementation (`_pytest`), thin public sessions. Versions are printed
before pytest runs so every log says what it tested.

    nox -s tests                      the default CPU suite, in the locked environment
    nox -s lint                       ruff check + ruff format --check
    nox -s lock                       regenerate requirements/test-py3.1x.lock (the locked test environment)
    nox -s stability                  pytest -m stability
    nox -s long                       pytest -m long: the compile runs left out of the default run for time
    nox -s mutation                   mutation testing of the core -> reports/mutation/ (mutation_sample: the CI sample)
    nox -s gpu_tests                  GPU tests in the machine's own environment (no venv)
    nox -s "compat(4.33.3-0.5.0)"     one transformers x peft pair (nox -l lists them all;
    nox -t compat                     every pair; -t compat-edges: the oldest and the newest)
    nox -s compat_report              reports/compat/*.json -> reports/COMPAT.md

QFORMER_LORA_RECORD=1 nox -s "compat(...)" records the pair's observed rows into
src/qformer_lora/resources/expectations/ instead of asserting them (review the diff before committing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# On the CPU machines pip finds this torch build on local disk; a bare "torch" would
# resolve to a multi-gigabyte CUDA build. It is installed first, and named again in
# every later install so no dependency can move it.
CPU_TORCH = "torch==2.13.0"
# The locked test environment (nox -s lock writes them): one constraints file per Python, every package of
# the test and lint extras pinned. The tests, lint, long, stability and mutation sessions install through it;
# the compat, newest, bisect and gpu_tests sessions install chosen releases on purpose and do not.
LOCK_PYTHONS = ("3.10", "3.11")
UV = "uv==0.13.10"  # what nox -s lock compiles with
PYTEST_ARGS = ("--strict-markers", "--strict-config", "-ra")
PRINT_VERSIONS = (
    "import sys, torch, transformers, peft; print('python', sys.version.split()[0], '| torch', "
    "torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, "
    "'| cuda', torch.cuda.is_available())"
)

# The version matrix's interpreter: any Python 3.11 on PATH (every pair installs there).
PY311 = "3.11"

# (transformers, peft, era-appropriate neighbours). Neighbours are pinned to releases of the
# same months as the pair: numpy < 2 up to transformers 4.38 (compiled against numpy 1),
# accelerate (peft's dependency) and huggingface_hub as they were then; tokenizers is left
# to pip within transformers' own bounds.
COMPAT_PAIRS = (
    ("4.33.3", "0.5.0", ("numpy<2", "accelerate==0.23.0", "huggingface_hub==0.17.3")),
    ("4.38.2", "0.10.0", ("numpy<2", "accelerate==0.28.0", "huggingface_hub==0.21.4")),
    ("4.45.2", "0.13.2", ("accelerate==1.0.1", "huggingface_hub==0.25.2")),
    ("4.48.3", "0.14.0", ("accelerate==1.3.0", "huggingface_hub==0.28.1")),  # the seed's era
    ("4.51.3", "0.15.2", ("accelerate==1.6.0", "huggingface_hub==0.30.2")),
    ("4.53.3", "0.16.0", ("accelerate==1.9.0", "huggingface_hub==0.33.4")),
    ("4.54.1", "0.17.0", ("accelerate==1.10.0", "huggingface_hub==0.34.3")),
    ("4.57.6", "0.17.1", ("accelerate==1.10.1", "huggingface_hub==0.36.0")),  # latest 4.x
    ("5.0.0", "0.18.1", ("accelerate==1.12.0", "huggingface_hub==1.3.0")),
    ("5.24.0", "0.21.2", ("accelerate==1.15.0", "huggingface_hub==2.4.0")),
    # the newest of both (the lock's pair); neighbours as the lock has them
    ("5.25.0", "0.22.0", ("accelerate==1.16.0", "huggingface_hub==2.5.0")),
)
EDGES = {f"{COMPAT_PAIRS[0][0]}-{COMPAT_PAIRS[0][1]}", f"{COMPAT_PAIRS[-1][0]}-{COMPAT_PAIRS[-1][1]}"}
# The project's runtime and test dependencies, installed explicitly next to the pair (the
# project itself goes in with --no-deps, so `.[test]` can never move transformers / peft).
PROJECT_DEPS = ("pillow", "safetensors", "tqdm", "packaging")
TEST_DEPS = ("pytest>=7.4", "hypothesis>=6.80", "pytest-benchmark>=4.0")
# What each pair runs: the seed's failure modes (regression), the NaN (stability), LoRA
# scope and counts, the custom forward against the native one, eager vs SDPA attention, and the step options
# (checkpointing, fused AdamW, static shapes, compile through aot_eager; inductor's C++
# builds are left to the default suite: they test torch, not the pair).
COMPAT_RUNS = {
    "regression+stability": ("-m", "regression or stability"),
    "scope+forward": ("tests/unit/test_lora_scope.py", "tests/unit/test_forward_equivalence.py"),
    # -m "not gpu" overrides pyproject's -m "not long": the compile equivalence runs (aot_eager) count here
    "step-options": ("tests/unit/test_step_options.py", "-k", "not inductor", "-m", "not gpu"),
    # eager vs SDPA: the implementation each component runs, pinned per release (issue 20, item 4)
    "attention": ("tests/unit/test_attention.py",),
}
COMPAT_DIR = Path("reports/compat")


def _lock_file(python: object) -> str:
    """The lock of the Python ``python`` ("3.11"): requirements/test-py3.11.lock."""
    return f"requirements/test-py{python}.lock"


def _install(session: nox.Session, *extra: str) -> None:
    lock = ("-c", _lock_file(session.python))
    session.install(*lock, CPU_TORCH)
    session.install(*lock, *extra, "-e", ".[test]")


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


@nox.session(python="3.11")
def long(session: nox.Session) -> None:
    """The tests left out of the default run for time (`pytest -m long`: torch.compile, the compile benchmark)."""
    _install(session)
    _pytest(session, "-m", "long")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check, with the ruff version pinned in pyproject.toml's lint extra."""
    lint_deps = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]["lint"]
    session.install("-c", _lock_file(session.python), *lint_deps)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


def _lock_command(python: str) -> tuple[str, ...]:
    """uv's command for the lock of ``python``, run from the repository root (the lock's header quotes it)."""
    return (
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        "--extra",
        "test",
        "--extra",
        "lint",
        "--config-file",
        "requirements/uv-lock.toml",  # torch: 2.13.0, resolved with the CPU build's dependencies
        "--python-version",
        python,
        "--python-platform",
        "x86_64-manylinux_2_28",
        "--no-header",
        "--quiet",
        "--output-file",
        _lock_file(python),
    )


def _lock_header(python: str) -> str:
    lock = _lock_file(python)
    return (
        f"# The locked test environment for Python {python}: every package of pyproject.toml's test and lint\n"
        "# extras, transitive ones included. torch is 2.13.0 with the CPU build's dependencies (no nvidia-*,\n"
        "# cuda-* or triton; requirements/uv-lock.toml). A constraints file, torch first as everywhere:\n"
        f'#   pip install -c {lock} torch==2.13.0 && pip install -c {lock} -e ".[test]"\n'
        "#   python scripts/check_lock.py     # the installed versions are these\n"
        f"# Regenerate with `nox -s lock` ({UV}; `nox -s lock -- --upgrade` moves every pin to the newest\n"
        "# release that resolves, `-- --upgrade-package NAME` one), which runs from the repository root:\n"
        f"#   {' '.join(_lock_command(python))}\n"
    )


@nox.session(python="3.11")
def lock(session: nox.Session) -> None:
    """Regenerate requirements/test-py3.10.lock and test-py3.11.lock from pyproject.toml with uv: the pins
    already there are kept where they still resolve (uv's preferences); arguments go to uv (--upgrade)."""
    session.install(UV)
    for python in LOCK_PYTHONS:
        session.run(*_lock_command(python), *session.posargs)
        path = Path(_lock_file(python))
        path.write_text(_lock_header(python) + path.read_text(encoding="utf-8"), encoding="utf-8")


@nox.session(python="3.11")
def mutation(session: nox.Session) -> None:
    """Mutation testing of the core (issue 22): mutmut over pyproject's [tool.mutmut], each mutant against
    the tests that reach it, then reports/mutation/ (score per module, every survivor); fails when a core
    module kills under 90 % of its non-equivalent mutants (reports/mutation/equivalent.toml)."""
    _install(session)
    started = time.monotonic()
    session.run("mutmut", "run", "--max-children", str(os.cpu_count() or 1))
    wall_s = f"{time.monotonic() - started:.0f}"
    session.run("python", "scripts/mutation_report.py", "--wall-s", wall_s, "--check")


@nox.session(python="3.11")
def mutation_sample(session: nox.Session) -> None:
    """The fixed mutation sample .ci/run runs (tests/mutation_sample.toml): fails on any surviving mutant."""
    _install(session)
    session.run("python", "scripts/mutation_sample.py")


@nox.session(venv_backend="none")
def gpu_tests(session: nox.Session) -> None:
    """GPU tests in the machine's existing environment: GPU machines have CUDA torch,
    transformers and peft preinstalled and no network, so nothing is created or downloaded.
    The interpreter is the one running nox (a GPU image may have no bare `python`); reports
    and the pytest-benchmark JSON go to $QFORMER_LORA_REPORT_DIR (default reports/gpu)."""
    report_dir = Path(os.environ.get("QFORMER_LORA_REPORT_DIR") or "reports/gpu")
    report_dir.mkdir(parents=True, exist_ok=True)
    session.env["PYTHONPATH"] = os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")]))
    session.run(sys.executable, "-c", PRINT_VERSIONS)
    session.run(
        sys.executable,
        "-m",
        "pytest",
        *PYTEST_ARGS,
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={report_dir / 'benchmark.json'}",
        *session.posargs,
    )


# ----------------------------------------------------------------------------- version matrix
def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: strict JSON (the probe writes a non-finite loss as the string "NaN", qformer_lora.jsonio)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _pip_install(session: nox.Session, log: Path, *args: str) -> str | None:
    """pip install ``args`` quietly into the session; None on success, else the tail of pip's output."""
    with log.open("w", encoding="utf-8") as out:
        try:
            session.run(
                "python", "-m", "pip", "install", "--progress-bar", "off", *args, stdout=out, stderr=subprocess.STDOUT
            )
            return None
        except nox.command.CommandFailed:
            pass
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-25:]
    session.log("pip failed:\n" + "\n".join(tail))
    return "\n".join(tail)


def _junit_summary(path: Path, exit_code: int | None) -> dict:
    """Counts and failing test ids from a pytest --junitxml file."""
    if not path.exists():
        return {"exit_code": exit_code, "error": "pytest wrote no report (interrupted or internal error)"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or "").strip().splitlines()
                failed.append(
                    {
                        "test": f"{case.get('classname')}::{case.get('name')}",
                        "kind": kind,
                        "message": message[0][:400] if message else "",
                    }
                )
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"exit_code": exit_code, **counts, "failed": failed}


def _pytest_exit_code(session: nox.Session, code_file: Path, *args: str) -> int:
    """Run pytest and return its exit code (0 ok, 1 failures, 5 nothing collected, ...) instead of
    stopping the session, so the pair's report can record the outcome before the session fails."""
    session.run(
        "python",
        "-c",
        "import pathlib, subprocess, sys; pathlib.Path(sys.argv[1]).write_text("
        "str(subprocess.call([sys.executable, '-m', 'pytest', *sys.argv[2:]])))",
        str(code_file),
        *args,
    )
    return int(code_file.read_text())


@nox.session(python=PY311, tags=["compat"])
@nox.parametrize(
    "transformers_version, peft_version, neighbours",
    [
        nox.param(t, p, n, id=f"{t}-{p}", tags=["compat-edges"] if f"{t}-{p}" in EDGES else [])
        for t, p, n in COMPAT_PAIRS
    ],
)
def compat(session: nox.Session, transformers_version: str, peft_version: str, neighbours: tuple) -> None:
    """One transformers x peft pair: install it with its neighbours, probe it into
    reports/compat/<transformers>-<peft>.json, run the regression / stability / scope /
    forward tests against the pair's pinned expectations."""
    started = time.monotonic()
    pair = f"{transformers_version}-{peft_version}"
    report = COMPAT_DIR / f"{pair}.json"
    tmp = Path(session.create_tmp())
    # tiny CPU models: extra OpenMP threads only spin-wait against other jobs on small machines
    session.env["OMP_NUM_THREADS"] = "1"
    requested = {
        "transformers": transformers_version,
        "peft": peft_version,
        "torch": CPU_TORCH,
        "neighbours": list(neighbours),
        "python": PY311,
    }
    steps = (
        ("torch", (CPU_TORCH,)),
        (
            "pair",
            (
                CPU_TORCH,
                f"transformers=={transformers_version}",
                f"peft=={peft_version}",
                *neighbours,
                *PROJECT_DEPS,
                *TEST_DEPS,
            ),
        ),
        ("project", ("--no-deps", "-e", ".")),
    )
    for step, args in steps:
        failure = _pip_install(session, tmp / f"pip-{step}.log", *args)
        if failure is not None:
            _write_json(
                report,
                {
                    "schema": 1,
                    "requested": requested,
                    "install": {"status": "error", "step": step, "pip_output_tail": failure},
                },
            )
            session.error(
                f"compat {pair}: pip could not install the {step} step on Python {PY311} (recorded in {report})"
            )
    session.run("python", "-m", "pip", "freeze", "--exclude-editable", stdout=(tmp / "freeze.txt").open("w"))
    session.run("python", "-c", PRINT_VERSIONS)
    try:
        session.run("python", "-m", "qformer_lora.repro.compat_probe", "--out", str(report))
    except nox.command.CommandFailed:
        _write_json(
            report,
            {
                "schema": 1,
                "requested": requested,
                "install": {"status": "ok"},
                "import": {
                    "status": "error",
                    "exception": "ProbeCrashed",
                    "message": "python -m qformer_lora.repro.compat_probe failed; see the session log",
                },
            },
        )
        session.error(f"compat {pair}: the probe could not run (recorded in {report})")

    tests = {}
    for name, args in COMPAT_RUNS.items():
        junit = tmp / f"junit-{name}.xml"
        junit.unlink(missing_ok=True)
        code = _pytest_exit_code(
            session, tmp / f"exit-{name}", *PYTEST_ARGS, f"--junitxml={junit}", *args, *session.posargs
        )
        tests[name] = _junit_summary(junit, code)
    data = json.loads(report.read_text(encoding="utf-8"))
    data["requested"] = requested
    data["install"] = {"status": "ok", "freeze": (tmp / "freeze.txt").read_text().split()}
    data["tests"] = tests
    data["session_seconds"] = round(time.monotonic() - started)  # install check + probe + tests
    # with QFORMER_LORA_RECORD=1 the expectation checks record instead of asserting
    data["tests_mode"] = (
        "record" if session.env.get("QFORMER_LORA_RECORD", os.environ.get("QFORMER_LORA_RECORD")) == "1" else "assert"
    )
    _write_json(report, data)

    problems = []
    for name, summary in tests.items():
        if summary.get("exit_code") == 5 or summary.get("tests", 0) == 0:
            problems.append(f"{name}: no tests collected")
        elif summary.get("exit_code") != 0 or summary.get("failures") or summary.get("errors"):
            shown = "; ".join(f["test"] for f in summary.get("failed", [])[:5]) or summary.get("error", "")
            problems.append(
                f"{name}: exit {summary.get('exit_code')}, {summary.get('failures', '?')} failed, "
                f"{summary.get('errors', '?')} errors ({shown})"
            )
    if problems:
        session.error(
            f"compat {pair} (transformers {transformers_version} / peft {peft_version}): " + " | ".join(problems)
        )


@nox.session(venv_backend="none")
def compat_report(session: nox.Session) -> None:
    """reports/compat/*.json -> reports/COMPAT.md (stdlib only; no venv, no installs)."""
    session.run(
        sys.executable, "scripts/compat_report.py", "--in", str(COMPAT_DIR), "--out", "reports/COMPAT.md", external=True
    )


# ----------------------------------------------------------------------------- exact boundaries
@nox.session(venv_backend="none")
def bisect(session: nox.Session) -> None:
    """The first release where each behaviour of reports/COMPAT.md's Boundaries changes: bisects the
    releases between the two matrix pairs (one venv per observed release, kept under .nox/bisect/),
    writes reports/compat/boundaries.json, then regenerates COMPAT.md. Arguments go to the script:
    `nox -s bisect -- --behaviour kwarg_conflict` (default: every boundary; --dry-run lists them)."""
    python = shutil.which(f"python{PY311}") or sys.executable  # the venvs' interpreter, as the matrix's
    session.run(sys.executable, "scripts/bisect_boundary.py", "--python", python, *session.posargs, external=True)
    if "--dry-run" not in session.posargs:
        compat_report(session)


# ----------------------------------------------------------------------------- newest releases
NEWEST_DIR = Path("reports/newest")  # not reports/compat: the matrix report reads every JSON there
# Every release-pinned check: the matrix's runs plus the default suite's tests that read a release's row or
# saw the 5.25.0 changes (known warnings, the untrainable-adapter probe, the golden curve, quantization).
NEWEST_RUNS = COMPAT_RUNS | {
    "release-pinned": (
        "tests/unit/test_clean_terminal.py",
        "tests/unit/test_untrainable_adapters.py",
        "tests/unit/test_train.py",
        "tests/unit/test_quantization.py",
        "tests/unit/test_release_diff.py",
    ),
}


NEWEST_VERSIONS = "import json, transformers, peft; print(json.dumps([transformers.__version__, peft.__version__]))"


def _newest_install(session: nox.Session, tmp: Path) -> None:
    """torch first, then the newest transformers and peft pip resolves beside it (outside the lock, on
    purpose), then the project (not editable)."""
    session.install(CPU_TORCH)
    newest = ("transformers", "peft", "bitsandbytes")  # and matplotlib: the clean-terminal run draws its curves
    session.install(CPU_TORCH, "--upgrade", *newest, "matplotlib>=3.5", *PROJECT_DEPS, *TEST_DEPS)
    session.install("--no-deps", "--force-reinstall", ".")
    session.run("python", "-m", "pip", "freeze", "--exclude-editable", stdout=(tmp / "freeze.txt").open("w"))
    session.run("python", "-c", PRINT_VERSIONS)


def _environment_lines(behaviours: list[dict]) -> list[str]:
    """One line per distinct environment change list, with the behaviours it applies to (differing ones first)."""
    groups: dict[tuple, list[str]] = {}
    for b in sorted(behaviours, key=lambda b: b["same"]):
        name = f"{b['table']}[{b['key']!r}]" + ("" if b["same"] else " (differs)")
        groups.setdefault(tuple(b.get("environment_changes") or ["none"]), []).append(name)
    return [f"- {'; '.join(changes)}: {', '.join(dict.fromkeys(names))}" for changes, names in groups.items()] or [
        "- nothing compared"
    ]


def _newest_markdown(pair: str, behaviours: list[dict], tests: dict, against: str | None) -> str:
    """reports/newest/<pair>.md: the behaviours that are the same, those that differ, other failures, and
    the command that records the release."""
    release = behaviours[0]["release"] if behaviours else pair
    compared = sorted({b["against"] for b in behaviours})
    same = sorted({f"{b['table']}[{b['key']!r}]" for b in behaviours if b["same"]})
    differ = sorted({b["line"] for b in behaviours if not b["same"]})
    other = [f"{f['test']}: {f['message']}" for s in tests.values() for f in s.get("failed", [])
             if "behaviour differs" not in f["message"]]  # fmt: skip
    transformers_version, peft_version = pair.split("-")
    lines = [
        f"# {release} against the recorded releases",
        "",
        f"Compared with: {', '.join(compared) or 'nothing (no release-pinned check ran)'}"
        + (f" (asked for: {against})" if against else ""),
        f"Same: {len(same)} behaviours. Different: {len(differ)}. Other failing tests: {len(other)}.",
        "",
        "## Behaviours that differ",
        "",
        *(f"- {line}" for line in differ or ["none"]),
        "",
        "## Tests that failed for another reason",
        "",
        *(f"- {line}" for line in other or ["none"]),
        "",
        "## What changed in the environment since the compared values were observed",
        "",
        "A behaviour can change with the machine or a neighbour package as well as with transformers / peft:",
        "",
        *_environment_lines(behaviours),
        "",
        "## Behaviours that are the same",
        "",
        *(f"- {name}" for name in same or ["none"]),
        "",
        "## To record this release",
        "",
        f'1. Add `("{transformers_version}", "{peft_version}", (<neighbours>))` to COMPAT_PAIRS in noxfile.py and '
        "the workflow's matrix, move the lock (`nox -s lock -- --upgrade-package transformers --upgrade-package "
        "peft`), commit.",
        "2. On that clean checkout (recording refuses uncommitted changes outside the tables and reports/):",
        "",
        f'       QFORMER_LORA_RECORD=1 nox -s "compat({pair})"',
        "       # in the lock's venv (the README's install), once per CPU capability:",
        f"       QFORMER_LORA_RECORD=1 python -m pytest {' '.join(NEWEST_RUNS['release-pinned'][:-1])}",
        "       ATEN_CPU_CAPABILITY=avx2 QFORMER_LORA_RECORD=1 \\",
        "           python -m pytest tests/unit/test_untrainable_adapters.py",
        "",
        "3. Review the diff of src/qformer_lora/resources/expectations/, write each change's cause in",
        "   reports/compat/CHANGES.md, run `nox -s compat_report`, commit.",
    ]
    return "\n".join(lines) + "\n"


@nox.session(python=PY311, tags=["newest"])
def newest(session: nox.Session) -> None:
    """The newest transformers and peft pip resolves (torch 2.13.0 named), outside the lock: every release-pinned
    check, compared with the recorded release it falls back to (or `-- --against "transformers X / peft Y"`),
    written to reports/newest/<transformers>-<peft>.md and .json. Fails naming each behaviour that differs."""
    tmp = Path(session.create_tmp())
    session.env["OMP_NUM_THREADS"] = "1"
    args = list(session.posargs)
    against = args[args.index("--against") + 1] if "--against" in args else None
    if against:
        session.env["QFORMER_LORA_COMPARE_WITH"] = against
    _newest_install(session, tmp)
    log = tmp / "behaviours.jsonl"
    log.unlink(missing_ok=True)
    session.env["QFORMER_LORA_BEHAVIOUR_LOG"] = str(log.resolve())
    tests = {}
    for name, run_args in NEWEST_RUNS.items():
        junit = tmp / f"junit-{name}.xml"
        junit.unlink(missing_ok=True)
        code = _pytest_exit_code(
            session, tmp / f"exit-{name}", *PYTEST_ARGS, "-p", "no:cacheprovider", f"--junitxml={junit}", *run_args
        )
        tests[name] = _junit_summary(junit, code)
    behaviours = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []
    printed = session.run("python", "-c", NEWEST_VERSIONS, silent=True)
    pair = "-".join(json.loads(printed.strip().splitlines()[-1]))
    NEWEST_DIR.mkdir(parents=True, exist_ok=True)
    (NEWEST_DIR / f"{pair}.md").write_text(_newest_markdown(pair, behaviours, tests, against), encoding="utf-8")
    _write_json(NEWEST_DIR / f"{pair}.json", {"behaviours": behaviours, "tests": tests, "against": against})
    failed = {n: s for n, s in tests.items() if s.get("exit_code") != 0}
    if failed:
        session.error(
            f"newest ({pair}): {sum(not b['same'] for b in behaviours)} behaviours differ, failing runs: "
            f"{', '.join(failed)} (details in {NEWEST_DIR / f'{pair}.md'})"
        )
    session.log(f"newest ({pair}): every release-pinned check agrees ({NEWEST_DIR / f'{pair}.md'})")
