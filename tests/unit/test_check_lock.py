"""scripts/check_lock.py on a lock written by hand and made-up installed versions (nothing is installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ..conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_lock.py"

LOCK = """\
# The locked test environment for Python 3.11: a header comment
#   uv pip compile pyproject.toml --output-file requirements/test-py3.11.lock
Jinja2==3.1.6
    # via torch
peft==0.22.0
    # via qformer-lora (pyproject.toml)
setuptools==84.2.1
    # via torch
torch==2.13.0
typing_extensions==4.16.0  # a trailing comment
"""

INSTALLED = {
    "jinja2": "3.1.6",
    "peft": "0.22.0",
    "torch": "2.13.0+cpu",
    "typing-extensions": "4.16.0",
    "qformer-lora": "0.1.0",
    "pip": "26.3",
    "setuptools": "65.5.0",
}


@pytest.fixture(scope="module")
def check():
    return load_script(SCRIPT)


def test_the_lock_is_read_as_normalized_names_and_exact_versions(check):
    assert check.parse_lock(LOCK) == {
        "jinja2": "3.1.6",
        "peft": "0.22.0",
        "setuptools": "84.2.1",
        "torch": "2.13.0",
        "typing-extensions": "4.16.0",
    }


@pytest.mark.parametrize("line", ["torch>=2.1", "numpy==2.2.6 ; python_full_version < '3.11'", "peft"])
def test_a_line_that_is_not_an_exact_pin_is_an_error(check, line):
    with pytest.raises(ValueError, match="line 2: not a name==version pin"):
        check.parse_lock(f"peft==0.22.0\n{line}\n")


def test_a_package_pinned_twice_is_an_error(check):
    with pytest.raises(ValueError, match="typing_extensions is pinned twice"):
        check.parse_lock("typing-extensions==4.16.0\ntyping_extensions==4.15.0\n")


def test_the_lock_s_environment_passes_with_the_cpu_label_and_the_ignored_packages(check):
    # torch 2.13.0+cpu is the lock's 2.13.0; the project, pip and setuptools (another version) are not checked
    assert check.compare(check.parse_lock(LOCK), INSTALLED) == []


def test_each_difference_is_listed_by_name(check):
    present = dict(INSTALLED, peft="0.21.2", transformers="5.25.0")
    del present["jinja2"]
    assert check.compare(check.parse_lock(LOCK), present) == [
        "jinja2: missing (the lock pins 3.1.6)",
        "peft: 0.21.2 installed, the lock pins 0.22.0",
        "transformers: 5.25.0 installed, not in the lock",
    ]


def test_a_cuda_torch_of_another_release_differs(check):
    assert check.compare({"torch": "2.13.0"}, {"torch": "2.14.1+cu130"}) == [
        "torch: 2.14.1+cu130 installed, the lock pins 2.13.0"
    ]


def test_main_exits_1_listing_the_differences_and_0_on_the_lock_s_versions(check, tmp_path, monkeypatch, capsys):
    lock = tmp_path / "test.lock"
    lock.write_text(LOCK, encoding="utf-8")
    monkeypatch.setattr(check, "installed", lambda: dict(INSTALLED, peft="0.21.2"))
    assert check.main(["--lock", str(lock)]) == 1
    assert "  - peft: 0.21.2 installed, the lock pins 0.22.0" in capsys.readouterr().err
    monkeypatch.setattr(check, "installed", lambda: dict(INSTALLED))
    assert check.main(["--lock", str(lock)]) == 0
    assert "the 4 installed distributions are the versions" in capsys.readouterr().out


def test_main_exits_2_on_a_lock_it_cannot_read(check, tmp_path, capsys):
    assert check.main(["--lock", str(tmp_path / "absent.lock")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_installed_distributions_are_read_from_importlib_metadata(check):
    found = check.installed()
    assert found["pytest"] == pytest.__version__
    assert all(name == check.normalize(name) for name in found)


def test_the_default_lock_is_the_running_python_s(check):
    assert check.default_lock().name == f"test-py{sys.version_info[0]}.{sys.version_info[1]}.lock"


@pytest.mark.parametrize("python", ["3.10", "3.11"])
def test_the_repository_s_locks_pin_the_cpu_torch_and_no_cuda_stack(check, python):
    pins = check.parse_lock((SCRIPT.parents[1] / "requirements" / f"test-py{python}.lock").read_text(encoding="utf-8"))
    assert pins["torch"] == "2.13.0"
    assert {"transformers", "peft", "pytest", "ruff", "mutmut", "bitsandbytes", "nox"} <= set(pins)
    assert [name for name in pins if name.startswith(("nvidia-", "cuda-")) or name == "triton"] == []


@pytest.mark.parametrize("python", ["3.10", "3.11"])
def test_each_lock_pins_a_recorded_matrix_pair_with_its_neighbours(check, python):
    """The locked tests run on a recorded release by construction: each Python's lock holds a pair of noxfile.py's
    COMPAT_PAIRS (with the neighbours the matrix gives it) that the expectation tables hold, 3.11 the newest one."""
    from qformer_lora.repro import expectations

    pins = check.parse_lock((SCRIPT.parents[1] / "requirements" / f"test-py{python}.lock").read_text(encoding="utf-8"))
    noxfile = load_script(SCRIPT.parents[1] / "noxfile.py")
    pairs = {(t, p): neighbours for t, p, neighbours in noxfile.COMPAT_PAIRS}
    pair = (pins["transformers"], pins["peft"])
    assert pair in pairs, f"the {python} lock pins transformers {pair[0]} / peft {pair[1]}, not a matrix pair"
    for neighbour in pairs[pair]:
        name, _, version = neighbour.partition("==")
        if version:
            assert pins[name.lower().replace("_", "-")] == version, neighbour
    assert f"transformers {pair[0]} / peft {pair[1]}" in expectations.releases_of("kwarg_conflict")
    if python == "3.11":
        assert pair == noxfile.COMPAT_PAIRS[-1][:2]  # the newest recorded pair
