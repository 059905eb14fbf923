"""Run the fixed mutation sample (tests/mutation_sample.toml) and fail if a sampled mutant survives.

    python scripts/mutation_sample.py [--sample tests/mutation_sample.toml] [--max-children N] [--keep DIR]

.ci/run runs this (issue 22: a fixed sample under 10 minutes); ``nox -s mutation`` runs the whole core.
mutmut reads its configuration from ./pyproject.toml and works in ./mutants, so the sample runs in a
temporary copy of src/ and tests/ whose pyproject.toml holds the sample's [tool.mutmut]: only the
sample's files mutated, only its tests collected. Exit status: 0 all sampled mutants killed (or
listed as equivalent), 1 a survivor (each named with its diff), 2 the sample matched no mutant or
mutmut itself failed.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutation_report  # noqa: E402 - the sibling script: one reading of mutmut's results

from qformer_lora.compat import tomllib  # noqa: E402 - tomli below Python 3.11

ROOT = Path(__file__).resolve().parent.parent


def sample_config(sample: dict) -> str:
    """The [tool.mutmut] table of the temporary copy (TOML text)."""

    def toml_list(values) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    return "\n".join(
        [
            "[tool.mutmut]",
            'source_paths = ["src/qformer_lora"]',
            f"only_mutate = {toml_list(sample['files'])}",
            f"pytest_add_cli_args_test_selection = {toml_list(sample['tests'])}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:benchmark", "-x", "-q"]',
            'process_isolation = "forkserver"',
            "use_git_change_detection = false",  # the copy is not a git checkout
            "",
        ]
    )


def prepare(work: Path, sample: dict) -> None:
    """src/, tests/ and a pyproject.toml whose [tool.mutmut] is the sample's, in ``work``."""
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    start = project.index("[tool.mutmut]")
    end = project.find("\n[", start + 1)
    rest = project[end + 1 :] if end != -1 else ""
    (work / "pyproject.toml").write_text(project[:start] + rest + "\n" + sample_config(sample), encoding="utf-8")


def survivors(work: Path, patterns: list[str]) -> tuple[list[dict], int]:
    """The sampled mutants not killed (nor equivalent), and how many mutants the sample matched."""
    equivalent = mutation_report.load_equivalent(ROOT / mutation_report.EQUIVALENT)
    rows = [
        row
        for module_rows in mutation_report.collect(work / "mutants", equivalent).values()
        for row in module_rows
        if any(fnmatch.fnmatch(row["name"], p) for p in patterns)
    ]
    return [r for r in rows if r["status"] not in ("killed", "equivalent")], len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=ROOT / "tests/mutation_sample.toml", help="the sample")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    sample = tomllib.loads(args.sample.read_text(encoding="utf-8"))
    work = args.keep or Path(tempfile.mkdtemp(prefix="mutation-sample-"))
    try:
        prepare(work, sample)
        started = time.monotonic()
        env = {**os.environ, "PYTHONPATH": ""}  # the copy's src (mutmut's trampolines), not a checkout's
        done = subprocess.run(
            ["mutmut", "run", "--max-children", str(args.max_children), *sample["functions"]], cwd=work, env=env
        )
        missed, matched = survivors(work, sample["functions"])
        print(f"mutation sample: {matched} mutants, {matched - len(missed)} killed, {time.monotonic() - started:.0f} s")
        if done.returncode != 0 or matched == 0:
            print(f"mutmut exited {done.returncode} having matched {matched} mutants of {args.sample}", file=sys.stderr)
            return 2
        for row in missed:
            print(f"NOT KILLED ({row['status']}): {row['name']}: {row['diff']}", file=sys.stderr)
        return 1 if missed else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
