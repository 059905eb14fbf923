#!/usr/bin/env python3
"""Bisect the releases between two matrix pairs to the first release where a recorded behaviour changes.

    python scripts/bisect_boundary.py [--behaviour kwarg_conflict ...] [--out reports/compat/boundaries.json]

(`nox -s bisect -- --behaviour kwarg_conflict` runs it; without --behaviour, every boundary.)
The boundaries are those of reports/COMPAT.md: for each behaviour of scripts/compat_report.py's
BEHAVIOURS, each pair of consecutive matrix pairs A, B (reports/compat/*.json) whose signatures
differ. For each, the releases from PyPI between A's and B's (final releases only, yanked ones
left out) are binary-searched, one venv per observed release under .nox/bisect/<t>-<p>/ (reused),
torch==2.13.0 named in every install, the project with --no-deps, and only the probe sections the
behaviour needs (``--observe``, run inside that venv).

Which library moved the behaviour: one library is changed at a time, the other held.
The first observation is the "decider": A's release of the library named first in BEHAVIOUR_DRIVERS
with B's release of the other. If it still behaves like A, the first library moved it, and it is
bisected with the other held at B's release (then B itself is the newer endpoint, already observed by
the matrix). If it behaves like B, the second library moved it, and that one is bisected with the
first held at A's release (then A itself is the older endpoint). Either way both endpoints of the
search are observed, and the decider is one of them. A decider like neither is recorded, not bisected.

Era neighbours (accelerate, huggingface_hub, numpy): a matrix pair's own pins for the pair itself;
between two pairs, anything from A's pin to B's (pip picks within them what the candidate accepts),
and A's numpy cap is kept (releases before transformers 4.39 were compiled against numpy 1).

Output: reports/compat/boundaries.json, one record per boundary: the pairs, the library bisected and
the one held (and why), the candidates and the yanked releases among them left out (yanked_skipped,
with PyPI's reason), the last release before the change and the first with it (``steps``: one per
change, from / to behaviour, last before, first changed; a boundary holding several changes, such as
two components moving in different releases, is split into single steps, each searched from the
previous one's first release), and every release observed with what it showed; or why it could not be
bisected. last_before / first_changed repeat the first step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[1]
CPU_TORCH = "torch==2.13.0"  # the noxfile's CPU_TORCH: named in every install so nothing moves it
LIBRARIES = ("transformers", "peft")
# which library to hold back first, per behaviour (the likelier mover first: one observation fewer)
BEHAVIOUR_DRIVERS = {
    "kwarg_conflict": ("transformers", "peft"),
    "native_convention": ("transformers", "peft"),
    "adapter_dtype": ("peft", "transformers"),
    "nan_default": ("peft", "transformers"),
    "lora_counts": ("transformers", "peft"),
    "meta_device": ("transformers", "peft"),
    "custom_forward": ("transformers", "peft"),
    "attention": ("transformers", "peft"),  # the attention code (attn_implementation) is transformers'
}
# probe sections each behaviour needs (see observe())
BEHAVIOUR_SECTIONS = {
    "kwarg_conflict": ("presets",),
    "native_convention": ("convention",),
    "adapter_dtype": ("adapter_dtype",),
    "nan_default": ("nan_default",),
    "lora_counts": ("lora_counts",),
    "meta_device": ("lora_counts",),
    "custom_forward": ("presets",),
    "attention": ("attention",),
}
SIMPLE_API = "https://pypi.org/simple/{name}/"  # PEP 691 JSON: what pip reads, with yanked flags


# ============================================================================ the search (pure)
class NonMonotone(ValueError):
    """The observations are not one step from the first candidate's behaviour to one other."""


@dataclasses.dataclass(frozen=True)
class Bisection:
    """first: index of the first candidate whose observation differs from candidates[0]'s, None when
    none does; observations: index -> observed value (probed or known); probed: indices probed, in order."""

    first: int | None
    observations: dict
    probed: tuple


def _check_step(candidates: Sequence, seen: Mapping[int, Hashable], reference: Hashable) -> None:
    """Refuse observations that are not reference ... reference, other ... other (one value), naming releases."""
    changed = None  # (index, value) of the first observation that differs from the reference
    for i in sorted(seen):
        value = seen[i]
        if changed is None:
            if value != reference:
                changed = (i, value)
            continue
        if value != changed[1]:
            kind = "back to the first behaviour" if value == reference else "a third behaviour"
            raise NonMonotone(
                f"not one step: {candidates[0]} shows {reference!r}, {candidates[changed[0]]} shows "
                f"{changed[1]!r}, then {candidates[i]} shows {value!r} ({kind})"
            )


def _search(candidates: Sequence, seen: Mapping[int, Hashable], observe: Callable, start: int) -> int:
    """Binary search from ``start`` for the first index whose observation differs from ``start``'s;
    len(candidates) when none does. Observations in ``seen`` narrow it first (they are assumed to be
    runs of one value each, which the callers check)."""
    reference = observe(start)
    lo = max(i for i, v in seen.items() if i >= start and v == reference)  # last known to behave as start
    hi = min((i for i, v in seen.items() if i > lo and v != reference), default=len(candidates))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if observe(mid) == reference:
            lo = mid
        else:
            hi = mid
    return hi


def _observer(candidates: Sequence, probe: Callable, seen: dict, probed: list) -> Callable[[int], Hashable]:
    """observe(i): ``seen[i]``, probing ``candidates[i]`` (and noting i in ``probed``) the first time."""

    def observe(i: int) -> Hashable:
        if i not in seen:
            seen[i] = probe(candidates[i])
            probed.append(i)
        return seen[i]

    return observe


def first_change(
    candidates: Sequence, probe: Callable[[object], Hashable], known: Mapping[int, Hashable] | None = None
) -> Bisection:
    """Binary search for the first of ``candidates`` (sorted) whose ``probe`` differs from the first's.

    ``known``: observations already made (index -> value), used instead of probing. The behaviour is
    assumed to be a step (one change); observations that contradict it raise NonMonotone naming the
    releases. Without ``known``, at most ceil(log2 n) + 1 probes for n candidates: one for the
    reference, then the step is one of n positions (1..n-1, or none), halved per probe.
    Raises ValueError for an empty list.
    """
    if not candidates:
        raise ValueError("first_change: no candidates")
    seen, probed = dict(known or {}), []
    observe = _observer(candidates, probe, seen, probed)
    reference = observe(0)
    _check_step(candidates, seen, reference)
    hi = _search(candidates, seen, observe, 0)
    _check_step(candidates, seen, reference)
    return Bisection(None if hi == len(candidates) else hi, seen, tuple(probed))


@dataclasses.dataclass(frozen=True)
class Steps:
    """firsts: index of the first candidate of each new behaviour, in order (empty when none changes);
    observations: index -> observed value (probed or known); probed: indices probed, in order."""

    firsts: tuple
    observations: dict
    probed: tuple


def _check_runs(candidates: Sequence, seen: Mapping[int, Hashable]) -> None:
    """Refuse observations where a behaviour comes back after another one (a, b, a), naming the releases:
    a sequence of steps shows each behaviour in one run."""
    runs: list[tuple[int, Hashable]] = []  # (first index, value) of each run, in order
    for i in sorted(seen):
        if runs and seen[i] == runs[-1][1]:
            continue
        earlier = next((run for run in runs if run[1] == seen[i]), None)
        if earlier is not None:
            between_ = runs[-1]
            raise NonMonotone(
                f"not a sequence of steps: {candidates[earlier[0]]} shows {earlier[1]!r}, "
                f"{candidates[between_[0]]} shows {between_[1]!r}, then {candidates[i]} shows {seen[i]!r} "
                "(back to an earlier behaviour)"
            )
        runs.append((i, seen[i]))


def changes(
    candidates: Sequence, probe: Callable[[object], Hashable], known: Mapping[int, Hashable] | None = None
) -> Steps:
    """Every change along ``candidates`` (sorted): the first change from the first's behaviour, then,
    from that release on, the first change from its behaviour, and so on (each one single-step binary
    search, reusing every observation made so far) until no later one differs.

    ``known`` as for first_change. A behaviour that comes back after another (a, b, a) among the
    observations raises NonMonotone naming the releases; a third behaviour is the next step. Each step is
    exact when every behaviour shows in one run of releases (one that comes back between two probes goes
    unseen, as for first_change). Raises ValueError for an empty list.
    """
    if not candidates:
        raise ValueError("changes: no candidates")
    seen, probed = dict(known or {}), []
    observe = _observer(candidates, probe, seen, probed)
    firsts: list[int] = []
    while True:
        _check_runs(candidates, seen)
        hi = _search(candidates, seen, observe, firsts[-1] if firsts else 0)
        _check_runs(candidates, seen)
        if hi == len(candidates):
            return Steps(tuple(firsts), seen, tuple(probed))
        firsts.append(hi)


# ============================================================================ releases (PyPI)
def _yank_flags(simple_json: dict) -> dict[str, list]:
    """Version text (as in the file names) -> each of its files' ``yanked`` value (False, True or a reason)."""
    files: dict[str, list] = {}
    for f in simple_json.get("files", []):
        match = re.match(r"^[^-]+-([^-]+?)(?:-|\.tar\.gz$|\.zip$)", f.get("filename", ""))
        if match:
            files.setdefault(match.group(1), []).append(f.get("yanked") or False)
    return files


def _listed_versions(simple_json: dict) -> list[tuple[Version, list]]:
    """(version, its files' yanked values) for each parseable version string of a PEP 691 project page."""
    files, out = _yank_flags(simple_json), []
    for text in simple_json.get("versions", []):
        try:
            version = Version(text)
        except InvalidVersion:
            continue
        out.append((version, [y for name, ys in files.items() if _same_version(name, version) for y in ys]))
    return out


def _is_final(version: Version) -> bool:
    return not (version.is_prerelease or version.is_devrelease)


def final_releases(simple_json: dict) -> list[Version]:
    """Sorted final releases from a PEP 691 project page: pre-, dev- and yanked releases left out
    (yanked = every file of the release yanked). Unparseable version strings are skipped."""
    return sorted({v for v, yanked in _listed_versions(simple_json) if _is_final(v) and not (yanked and all(yanked))})


def yanked_releases(simple_json: dict) -> dict[Version, str]:
    """The final releases of a PEP 691 project page that final_releases leaves out as yanked (every file
    yanked) -> the reason PyPI gives ("" when none is given)."""
    return {
        v: "; ".join(sorted({y for y in yanked if isinstance(y, str)}))
        for v, yanked in _listed_versions(simple_json)
        if _is_final(v) and yanked and all(yanked)
    }


def yanked_between(yanked: Mapping[Version, str], low: str, high: str) -> list[dict]:
    """The yanked releases strictly between ``low`` and ``high`` (the ones a search over them skips),
    sorted by version, each as {"version", "reason"}."""
    lo, hi = Version(low), Version(high)
    return [{"version": str(v), "reason": yanked[v]} for v in sorted(yanked) if lo < v < hi]


def _same_version(text: str, version: Version) -> bool:
    try:
        return Version(text) == version
    except InvalidVersion:
        return False


@dataclasses.dataclass(frozen=True)
class Releases:
    """One project's releases on PyPI: ``final`` (sorted; pre-, dev- and yanked releases left out) and
    ``yanked`` (the final releases left out as yanked -> PyPI's reason, "" when none is given)."""

    final: list
    yanked: dict

    @classmethod
    def from_page(cls, simple_json: dict) -> Releases:
        return cls(final_releases(simple_json), yanked_releases(simple_json))


def pypi_page(name: str) -> dict:
    """PyPI's PEP 691 JSON project page for ``name`` (versions, and files with their yanked flags)."""
    request = urllib.request.Request(
        SIMPLE_API.format(name=name), headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - PyPI's own index
        return json.load(response)


def between(releases: list[Version], low: str, high: str) -> list[str]:
    """Releases from ``low`` to ``high`` inclusive (both ends included even if PyPI lists neither)."""
    lo, hi = Version(low), Version(high)
    return [str(v) for v in sorted({lo, hi, *(v for v in releases if lo < v < hi)})]


# ============================================================================ observing (inside a candidate venv)
def observed_convention(name: str) -> str:
    """Which input convention the installed library's own forward follows for tiny preset ``name``,
    observed: the one whose native loss equals the custom forward's (compat.native_convention's
    version rule is overridden for each try, so the answer does not come from that rule)."""
    import torch

    from qformer_lora import compat, forward, presets, synthetic

    model = presets.build_model(name, seed=0)
    batch = synthetic.random_batch(model, seed=0)
    with torch.no_grad():
        custom = float(forward.custom_forward(model, batch).loss)
    rule, matches = compat.native_convention, []
    try:
        for convention in (compat.PREPEND, compat.PLACEHOLDERS):
            compat.native_convention = lambda config, c=convention: c
            try:
                with torch.no_grad():
                    native = float(model(**compat.native_inputs(model, batch)).loss)
            except Exception:  # noqa: BLE001 - a convention the forward refuses is not its convention
                continue
            if math.isclose(native, custom, rel_tol=1e-4, abs_tol=1e-6):
                matches.append(convention)
    finally:
        compat.native_convention = rule
    return matches[0] if len(matches) == 1 else (f"both ({', '.join(matches)})" if matches else "neither")


def observe(sections: Sequence[str]) -> dict:
    """The probe's ``sections`` in compat_probe's JSON shape (so compat_report's signatures apply);
    "convention" writes presets.<name>.native_convention as observed by observed_convention."""
    import warnings

    import torch

    from qformer_lora.repro import compat_probe

    torch.set_num_threads(1)  # tiny models; shared cores
    result = {"schema": 1, "versions": compat_probe.installed_versions(), "install": {"status": "ok"}}
    try:
        from qformer_lora import compat  # noqa: F401 - importing it is the check
    except Exception as err:  # noqa: BLE001 - a release that cannot import the project is an observation
        return result | {"import": {"status": "error", "exception": type(err).__name__, "message": str(err)}}
    result["import"] = {"status": "ok"}
    runs = {
        "presets": lambda: {"presets": {n: compat_probe.probe_preset(n) for n in compat_probe.TINY_PRESETS}},
        "convention": lambda: {
            "presets": {n: {"native_convention": observed_convention(n)} for n in compat_probe.TINY_PRESETS}
        },
        "lora_counts": lambda: {"lora_counts": compat_probe.probe_lora_counts()},
        "adapter_dtype": lambda: {"adapter_dtype": compat_probe.probe_adapter_dtype()},
        "nan_default": lambda: {"nan_default": compat_probe.probe_nan_default()},
        # the whole matrix section (under a second per preset): compat_report.attention_sig reads its
        # "default" runs, the implementation each component actually ran, counted as the matrix counts it
        "attention": lambda: {"attention": compat_probe.probe_attention()},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old releases' deprecation chatter; outcomes are recorded
        for section in sections:
            # _section turns an exception into {"status": "error", ...}: kept apart, it is no observation
            out = compat_probe._section(runs[section])
            if out.get("status") == "error":
                result.setdefault("section_errors", {})[section] = out
            else:
                result |= out
    return result


# ============================================================================ venvs (pip)
@dataclasses.dataclass(frozen=True)
class Config:
    """One release pair with its era neighbours: what one venv holds."""

    transformers: str
    peft: str
    neighbours: tuple

    @property
    def name(self) -> str:
        return f"{self.transformers}-{self.peft}"


class InstallFailed(RuntimeError):
    """pip could not install a configuration (the message ends with pip's last lines)."""


def project_dependencies() -> list[str]:
    """pyproject's runtime dependencies other than torch / transformers / peft (installed next to the pair,
    since the project itself goes in with --no-deps)."""
    import tomllib  # novm: run by `nox -s bisect` on the matrix interpreter, Python 3.11 (noxfile PY311)

    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return [d for d in deps if re.split(r"[<>=!~ ;\[]", d)[0] not in ("torch", *LIBRARIES)]


def _pip(python: Path, log, *args: str) -> None:
    command = [str(python), "-m", "pip", "install", "--progress-bar", "off", *args]
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    if subprocess.call(command, stdout=log, stderr=subprocess.STDOUT) != 0:
        raise InstallFailed(f"pip install {' '.join(args)} failed")


def _new_venv(path: Path, python: str, layer: Path | None) -> Path:
    """A bare venv at ``path``; with ``layer``, that site-packages directory is on its path after its own."""
    subprocess.run([python, "-m", "venv", str(path)], check=True)
    exe = path / "bin" / "python"
    if layer is not None:
        (_purelib(exe) / "_bisect_torch_layer.pth").write_text(f"{layer}\n", encoding="utf-8")
    return exe


def _purelib(exe: Path) -> Path:
    """The site-packages directory of the venv whose interpreter is ``exe``."""
    command = [str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    return Path(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


def torch_layer(root: Path, python: str) -> Path:
    """site-packages of one venv holding torch==2.13.0 alone, shared by every candidate venv through a .pth
    file: torch is the same in all of them, and unpacking its 750 MB per release costs minutes on shared
    cores. pip in a candidate venv sees it installed ("Requirement already satisfied: torch==2.13.0"); a
    package the candidate needs in another version goes into the candidate's own site-packages, which
    comes first on sys.path."""
    path = root / "_torch-layer"
    marker = path / "bisect-torch.txt"
    exe = path / "bin" / "python"
    if not (marker.exists() and marker.read_text(encoding="utf-8").strip() == CPU_TORCH):
        shutil.rmtree(path, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        exe = _new_venv(path, python, None)
        with (root / "_torch-layer.log").open("w", encoding="utf-8") as log:
            _pip(exe, log, CPU_TORCH)
        marker.write_text(CPU_TORCH + "\n", encoding="utf-8")
    return _purelib(exe)


def venv_for(config: Config, root: Path, python: str) -> Path:
    """The venv for ``config`` under ``root``/<t>-<p>, built once (a marker records what it holds; a
    different request rebuilds it). Raises InstallFailed with the tail of pip's log."""
    path = root / config.name
    marker = path / "bisect-config.json"
    wanted = {**dataclasses.asdict(config), "neighbours": list(config.neighbours), "torch": CPU_TORCH}
    if marker.exists() and json.loads(marker.read_text(encoding="utf-8")) == wanted:
        return path / "bin" / "python"
    shutil.rmtree(path, ignore_errors=True)
    exe = _new_venv(path, python, torch_layer(root, python))
    log_path = path / "pip.log"
    with log_path.open("w", encoding="utf-8") as log:
        try:
            _pip(exe, log, CPU_TORCH)
            pins = (f"transformers=={config.transformers}", f"peft=={config.peft}", *config.neighbours)
            _pip(exe, log, CPU_TORCH, *pins, *project_dependencies())
            _pip(exe, log, "--no-deps", "-e", str(REPO))
        except InstallFailed as err:
            log.flush()
            tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise InstallFailed(f"{config.name}: {err}\n{tail}") from None
    marker.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    return exe


def observe_in_venv(config: Config, sections: Sequence[str], root: Path, python: str) -> dict:
    """Run ``--observe sections`` in the config's venv; cached per section in the venv folder."""
    exe = venv_for(config, root, python)
    cache = exe.parent.parent / f"observed-{'+'.join(sections)}.json"
    if not cache.exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
        started = time.monotonic()
        subprocess.run(
            [str(exe), str(Path(__file__).resolve()), "--observe", ",".join(sections), "--observe-out", str(cache)],
            check=True,
            env=env,
        )
        data = json.loads(cache.read_text(encoding="utf-8"))
        data["observe_seconds"] = round(time.monotonic() - started, 1)
        cache.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return json.loads(cache.read_text(encoding="utf-8"))


# ============================================================================ one boundary
def compat_report_module():
    """scripts/compat_report.py (its BEHAVIOURS, signatures and report loading), imported by path."""
    spec = importlib.util.spec_from_file_location("compat_report", REPO / "scripts" / "compat_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(row: dict) -> dict[str, str]:
    neighbours = (row.get("requested") or {}).get("neighbours") or []
    return dict(n.split("==", 1) for n in neighbours if "==" in n)


def neighbours_for(t: str, p: str, a: dict, b: dict) -> tuple:
    """A matrix pair's own pins for the pair itself; otherwise each package pinned by both pairs
    between A's and B's pins, and every cap (numpy<2) either pair sets."""
    for row in (a, b):
        if (t, p) == (row["_t"], row["_p"]):
            return tuple((row.get("requested") or {}).get("neighbours") or [])
    pa, pb = _pins(a), _pins(b)
    out = []
    for name in sorted(set(pa) & set(pb)):
        low, high = sorted((pa[name], pb[name]), key=Version)
        out.append(f"{name}>={low},<={high}")
    caps = {n for row in (a, b) for n in (row.get("requested") or {}).get("neighbours") or [] if "==" not in n}
    return (*out, *sorted(caps))


class ProbeFailed(RuntimeError):
    """A configuration could not be observed (install, import or a probe section failed)."""


@dataclasses.dataclass
class Boundary:
    """One boundary of one behaviour between matrix rows ``a`` and ``b`` (compat_report rows)."""

    behaviour: str
    a: dict
    b: dict
    signature: Callable
    describe: Callable
    root: Path
    python: str
    observed: list = dataclasses.field(default_factory=list)

    def release(self, lib: str, row: dict) -> str:
        return row["_t"] if lib == "transformers" else row["_p"]

    def value(self, t: str, p: str) -> Hashable:
        """The behaviour's signature at transformers ``t`` / peft ``p``: a matrix pair's from its report,
        any other from a venv (ProbeFailed when that cannot be observed)."""
        source, row = "matrix", next((r for r in (self.a, self.b) if (r["_t"], r["_p"]) == (t, p)), None)
        if row is None:
            source, config = "probe", Config(t, p, neighbours_for(t, p, self.a, self.b))
            try:
                row = observe_in_venv(config, BEHAVIOUR_SECTIONS[self.behaviour], self.root, self.python)
            except (InstallFailed, subprocess.CalledProcessError) as err:
                raise ProbeFailed(f"transformers {t} / peft {p} could not be observed: {err}") from None
            failed = {k: v for k, v in (row.get("section_errors") or {}).items()} or (
                None if (row.get("import") or {}).get("status") == "ok" else {"import": row.get("import")}
            )
            if failed:
                raise ProbeFailed(f"transformers {t} / peft {p}: probe failed: {json.dumps(failed)[:400]}")
        value = self.signature(row)
        old, new = self.signature(self.a), self.signature(self.b)
        versions = row.get("versions") or {}
        self.observed.append(
            {
                "transformers": t,
                "peft": p,
                "source": source,
                "observed": self.describe(value),
                "behaves_as": "old" if value == old else "new" if value == new else "other",
                "neighbours": {k: versions.get(k) for k in ("accelerate", "huggingface-hub", "tokenizers", "numpy")},
            }
        )
        return value


def _plan(boundary: Boundary, releases: Mapping[str, Releases]) -> dict:
    """Observe the decider and choose the library to bisect, the one held, and the search's endpoints;
    yanked_skipped: the bisected library's yanked releases between them, which the search leaves out."""
    a, b = boundary.a, boundary.b
    first, second = BEHAVIOUR_DRIVERS[boundary.behaviour]
    decider = {first: boundary.release(first, a), second: boundary.release(second, b)}
    value = boundary.value(decider["transformers"], decider["peft"])
    old, new = boundary.signature(a), boundary.signature(b)
    said = f"{first} {decider[first]} with {second} {decider[second]}"
    if value == old:
        lib, held = first, {second: boundary.release(second, b)}
        why = (
            f"{said} behaves like {a['_t']} / {a['_p']}, so {first} moved it; {second} held at the newer "
            f"pair's {held[second]}, which makes that pair itself the newer end of the search"
        )
        known_ends = (value, new)
    elif value == new:
        lib, held = second, {first: boundary.release(first, a)}
        why = (
            f"{said} behaves like {b['_t']} / {b['_p']}, so {second} moved it; {first} held at the older "
            f"pair's {held[first]}, which makes that pair itself the older end of the search"
        )
        known_ends = (old, value)
    else:
        raise ProbeFailed(f"{said} shows a third behaviour ({boundary.describe(value)}): neither library alone")
    low, high = boundary.release(lib, a), boundary.release(lib, b)
    return {
        "bisected": lib,
        "held": held,
        "why_held": why,
        "candidates": between(releases[lib].final, low, high),
        "yanked_skipped": yanked_between(releases[lib].yanked, low, high),
        "known_ends": known_ends,
    }


def bisect_boundary(boundary: Boundary, releases: Mapping[str, Releases]) -> dict:
    """The boundary's record for boundaries.json: bisected, or why not (with the plan once the decider
    has chosen the library, so a search that fails still says what it was searching)."""
    a, b = boundary.a, boundary.b
    record = {
        "behaviour": boundary.behaviour,
        "from_pair": f"{a['_t']}-{a['_p']}",
        "to_pair": f"{b['_t']}-{b['_p']}",
        "old": boundary.describe(boundary.signature(a)),
        "new": boundary.describe(boundary.signature(b)),
    }
    started = time.monotonic()
    try:
        plan = _plan(boundary, releases)
        lib, held, candidates = plan["bisected"], plan["held"], plan["candidates"]
        record |= {k: v for k, v in plan.items() if k != "known_ends"}

        def probe(version: str) -> Hashable:
            pair = {lib: version, **held}
            return boundary.value(pair["transformers"], pair["peft"])

        known = {0: plan["known_ends"][0], len(candidates) - 1: plan["known_ends"][1]}
        found = changes(candidates, probe, known)
        if not found.firsts:  # cannot happen with ends that differ; kept as a guard
            raise ProbeFailed("no change between the ends of the search")
        steps = [
            {
                "from": boundary.describe(found.observations[start]),
                "to": boundary.describe(found.observations[first]),
                "last_before": candidates[first - 1],
                "first_changed": candidates[first],
            }
            for start, first in zip((0, *found.firsts), found.firsts, strict=False)
        ]
        # last_before / first_changed: the first step (the only one for a single-step boundary)
        record |= {"status": "bisected", **{k: steps[0][k] for k in ("last_before", "first_changed")}}
        record["steps"] = steps
    except (ProbeFailed, NonMonotone) as err:
        record |= {"status": "not bisected", "reason": str(err)}
    record["probes"] = boundary.observed
    record["seconds"] = round(time.monotonic() - started)
    return record


# ============================================================================ command line
def boundaries_to_run(report, rows: list[dict], names: Sequence[str]) -> list[tuple[str, dict, dict]]:
    """(behaviour, row A, row B) for each change in reports/compat between consecutive pairs."""
    return [(name, a, b) for name in names for a, b in report.changes(rows, report.BEHAVIOURS[name][1])]


def write_records(path: Path, records: list[dict]) -> None:
    """Merge ``records`` into ``path`` (records of the same boundary replaced), atomically."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    keep = {(r["behaviour"], r["from_pair"], r["to_pair"]) for r in records}
    old = [r for r in data.get("boundaries", []) if (r["behaviour"], r["from_pair"], r["to_pair"]) not in keep]
    data = {
        "schema": 1,
        "about": __doc__.split("\n\n")[0] + f" Written by scripts/bisect_boundary.py; {CPU_TORCH} (CPU) throughout.",
        "boundaries": sorted(
            old + records, key=lambda r: (list(BEHAVIOUR_DRIVERS).index(r["behaviour"]), r["from_pair"])
        ),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--behaviour", action="append", choices=list(BEHAVIOUR_DRIVERS), help="default: all")
    parser.add_argument("--in", dest="folder", type=Path, default=REPO / "reports" / "compat")
    parser.add_argument("--out", type=Path, help="default: <--in>/boundaries.json")
    parser.add_argument("--root", type=Path, default=REPO / ".nox" / "bisect", help="where the venvs are kept")
    parser.add_argument("--python", default=sys.executable, help="interpreter the venvs are made from (3.11)")
    parser.add_argument("--dry-run", action="store_true", help="list the boundaries and their candidates only")
    parser.add_argument("--observe", help=argparse.SUPPRESS)  # inside a candidate venv: sections to probe
    parser.add_argument("--observe-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.observe:
        from qformer_lora import jsonio

        jsonio.write(args.observe_out, observe(args.observe.split(",")))
        return 0
    report = compat_report_module()
    rows = report.load_reports(args.folder)
    todo = boundaries_to_run(report, rows, args.behaviour or list(BEHAVIOUR_DRIVERS))
    releases = {lib: Releases.from_page(pypi_page(lib)) for lib in LIBRARIES}
    records = []
    for name, a, b in todo:
        _, signature, describe = report.BEHAVIOURS[name]
        print(f"bisect {name}: {a['_t']} / {a['_p']} -> {b['_t']} / {b['_p']}", flush=True)
        if args.dry_run:
            for lib in LIBRARIES:
                column = "_t" if lib == "transformers" else "_p"
                print(f"  {lib}: {' '.join(between(releases[lib].final, a[column], b[column]))}")
            continue
        boundary = Boundary(name, a, b, signature, describe, args.root, args.python)
        records.append(bisect_boundary(boundary, releases))
        last = records[-1]
        found = ", then ".join(step["first_changed"] for step in last.get("steps", [])) or last.get("reason")
        print(f"  -> {found} ({len(last['probes'])} observed)", flush=True)
        write_records(args.out or args.folder / report.BOUNDARIES_FILE, records)  # kept as it goes
    return 0


if __name__ == "__main__":
    sys.exit(main())
