"""Mutation score per core module, from mutmut's results, into reports/mutation/.

    python scripts/mutation_report.py [--mutants mutants] [--out reports/mutation] [--wall-s S] [--check]

Reads what ``mutmut run`` left under ``mutants/`` (one ``<module>.py.meta`` JSON per mutated file:
each mutant's pytest exit code) and the mutated sources (each mutant is a copy of its function,
``x_<name>__mutmut_<n>``, beside the original ``x_<name>__mutmut_orig``), and writes:

* ``summary.json``: per module, mutants by status and the score;
* ``README.md``: the table, every survivor with its one-line diff, every equivalent mutant with its reason.

Score = detected / (mutants - equivalent), detected = killed + timeout. A mutant that makes its tests
run past mutmut's CPU-time limit (an endless loop: ``iter(read, None)``) is detected, as PIT
("TIMED_OUT") and Stryker ("Timeout") count it: the test run never passes. A mutant no test reaches
("no tests") or not run ("not checked") counts as not detected. Equivalent mutants are listed in
``reports/mutation/equivalent.toml`` (name -> the diff it was judged on and the reason); an entry
whose diff no longer matches the mutant is reported as stale and not applied. ``--check`` exits 1
when a module is below TARGET (issue 22: at least 90 % of non-equivalent mutants killed in each core module).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import platform
import re
import sys
from pathlib import Path

from qformer_lora.compat import tomllib  # tomli below Python 3.11

TARGET = 0.90
EQUIVALENT = Path("reports/mutation/equivalent.toml")
# mutmut 3.8's exit codes (mutmut/stats.py status_by_exit_code), folded to what the score needs
STATUS = {1: "killed", 3: "killed", 37: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -11: "killed",
          -9: "killed", None: "not checked"}  # fmt: skip


def mutant_diffs(mutated_source: Path) -> dict[str, str]:
    """{mutant function name: "old line -> new line"} for every mutant in one mutated file."""
    text = mutated_source.read_text(encoding="utf-8")
    lines = text.splitlines()
    bodies = {  # a function's lines, its name taken out of the def line so a mutated default shows as a change
        node.name: [lines[node.lineno - 1].replace(node.name, "f", 1), *lines[node.lineno : node.end_lineno]]
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "__mutmut_" in node.name
    }
    diffs = {}
    for name, body in bodies.items():
        match = re.fullmatch(r"(.*)__mutmut_(\d+)", name)
        if match is None:
            continue
        original = bodies.get(match.group(1) + "__mutmut_orig", [])
        changed = [
            line[0] + " " + line[1:].strip()
            for line in difflib.unified_diff(original, body, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        diffs[name] = "  ".join(changed)
    return diffs


def status_of(name: str, code, diff: str, equivalent: dict[str, dict]) -> str:
    """mutmut's exit code as a status; a mutant not killed but listed in ``equivalent`` is "equivalent" while
    the diff it was judged on still matches, "stale equivalent" once it does not."""
    status = STATUS.get(code, "suspicious")
    if status == "killed" or name not in equivalent:
        return status
    return "equivalent" if equivalent[name].get("diff") == diff else "stale equivalent"


def collect(mutants: Path, equivalent: dict[str, dict]) -> dict[str, list[dict]]:
    """{module: [{name, status, diff}]} from mutmut's .meta files under ``mutants`` (status_of)."""
    modules: dict[str, list[dict]] = {}
    for meta in sorted(mutants.glob("src/**/*.py.meta")):
        source = meta.with_suffix("")  # x.py.meta -> x.py
        module = ".".join(source.relative_to(mutants / "src").with_suffix("").parts)
        diffs = mutant_diffs(source)
        exit_codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        rows = [(name, code, diffs.get(name.rsplit(".", 1)[-1], "?")) for name, code in sorted(exit_codes.items())]
        modules[module] = [
            {"name": name, "status": status_of(name, code, diff, equivalent), "diff": diff} for name, code, diff in rows
        ]
    return modules


def load_equivalent(path: Path = EQUIVALENT) -> dict[str, dict]:
    if not path.exists():
        return {}
    return tomllib.loads(path.read_text(encoding="utf-8")).get("mutant", {})


def score(rows: list[dict]) -> dict:
    """Counts by status for one module; equivalent survivors are taken out of the denominator."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    # a mutant not checked (an interrupted run) counts as not killed: the score never flatters a partial run
    judged = len(rows) - counts.get("equivalent", 0) - counts.get("skipped", 0)
    detected = counts.get("killed", 0) + counts.get("timeout", 0)  # PIT's and Stryker's rule, module docstring
    return {"mutants": len(rows), **counts, "score": detected / judged if judged else 1.0}


def markdown(summary: dict, modules: dict[str, list[dict]], equivalent: dict[str, dict]) -> str:
    lines = [
        "# Mutation testing of the core",
        "",
        f"Generated by `nox -s mutation` (mutmut {summary['mutmut']}, {summary['machine']}); "
        f"whole run {summary['wall_s']:.0f} s. Score = (killed + timeout) / (mutants - equivalent): a mutant "
        "whose tests run past mutmut's CPU-time limit (an endless loop) is detected, as PIT and Stryker count it; "
        f"target {TARGET:.0%} per module (issue 22). Do not edit by hand.",
        "",
        *([summary["how"], ""] if summary.get("how") else []),
        "| module | mutants | killed | survived | no tests | timeout | not checked | equivalent | score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for module, s in summary["modules"].items():
        lines.append(
            f"| {module} | {s['mutants']} | {s.get('killed', 0)} | {s.get('survived', 0)} | {s.get('no tests', 0)} "
            f"| {s.get('timeout', 0)} | {s.get('not checked', 0)} | {s.get('equivalent', 0)} | {s['score']:.1%} |"
        )
    lines += ["", "## Not killed (survived, no tests, not checked, timeout, stale equivalent)", ""]
    for rows in modules.values():
        for row in rows:
            if row["status"] not in ("killed", "equivalent"):
                lines.append(f"* `{row['name']}` ({row['status']}): `{row['diff']}`")
    lines += ["", "## Equivalent mutants", ""]
    for rows in modules.values():
        for row in rows:
            if row["status"] == "equivalent":
                lines.append(f"* `{row['name']}`: `{row['diff']}` -- {equivalent[row['name']]['reason']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's working tree")
    parser.add_argument("--out", type=Path, default=Path("reports/mutation"), help="where the report goes")
    parser.add_argument("--wall-s", type=float, default=float("nan"), help="the run's wall time, seconds")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when a module scores below {TARGET:.0%}")
    parser.add_argument("--how", default="", help="how the verdicts were reached, when not by one `nox -s mutation`")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    equivalent = load_equivalent()
    modules = collect(args.mutants, equivalent)
    if not modules:
        print(f"no mutmut results under {args.mutants}/src: run `mutmut run` first", file=sys.stderr)
        return 2
    summary = {
        "mutmut": version("mutmut"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
        "wall_s": args.wall_s,
        "how": args.how,
        "target": TARGET,
        "modules": {module: score(rows) for module, rows in modules.items()},
    }
    from qformer_lora import writes  # all-or-nothing writes: a report is never left half-written

    args.out.mkdir(parents=True, exist_ok=True)
    writes.atomic(args.out / "summary.json", json.dumps(summary, indent=2) + "\n", "the mutation summary")
    writes.atomic(args.out / "README.md", markdown(summary, modules, equivalent), "the mutation report")
    below = {m: s["score"] for m, s in summary["modules"].items() if s["score"] < TARGET}
    for module, s in summary["modules"].items():
        print(f"{module:32s} {s['score']:7.1%}  ({s.get('killed', 0)} of {s['mutants']} killed)")
    if args.check and below:
        print(f"below the {TARGET:.0%} target: {', '.join(below)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
