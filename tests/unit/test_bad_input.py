"""Bad input, as a table (issue 18, item 6; README "Reliability"): each class gets a clear error that
names the item, through the real ``qformer-lora train`` entry point, and nothing already on disk is lost.

Every case starts beside a finished earlier run (``earlier``) whose files are hashed before and
compared after. Each case runs into a new output directory, which must not end up holding a
checkpoint; a case caught before anything is written also runs with ``--overwrite true`` into the
earlier run's directory, which must stay byte for byte: the run that would replace it is refused
before it deletes anything. (Images are decoded lazily, in the loader: a bad image is caught in the
first validation, after ``--overwrite`` has done what it was asked to do, so those classes run into
the new directory only.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from qformer_lora import checkpoint, cli, data
from qformer_lora.training.run_config import TINY_BASE_CHECKPOINT

SHAPES = data.SHAPES_DIR
GOOD = {"image": "images/val_000.png", "instruction": "what colour is the shape", "answer": "red"}


def files_of(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 1-epoch run on 8 shapes samples (copied per case, so each case sees it whole)."""
    root = tmp_path_factory.mktemp("finished")
    manifest = write_manifest(root, [GOOD | {"id": f"s{i}"} for i in range(8)])
    run = root / "run"
    assert (
        cli.main(["train", *data_args(manifest), "--epochs", "1", "--output-dir", str(run), "--progress", "false"]) == 0
    )
    return run


def write_manifest(directory: Path, records: list[dict], name: str = "m.jsonl") -> Path:
    images = directory / "images"
    if not images.exists():
        shutil.copytree(SHAPES / "images", images)
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def data_args(manifest: Path) -> list[str]:
    return ["--train-manifest", str(manifest), "--val-manifest", str(manifest), "--batch-size", "4"]


def manifest_case(records=None, raw: bytes | None = None, setup=None):
    """A case whose training manifest is ``records`` (or ``raw`` bytes), after ``setup(directory)``."""

    def build(directory: Path) -> list[str]:
        path = write_manifest(directory, records or [GOOD])
        if raw is not None:
            path.write_bytes(raw)
        if setup is not None:
            setup(directory)
        return data_args(path)

    return build


def image_file(name: str, content: bytes):
    def setup(directory: Path) -> None:
        (directory / "images" / name).write_bytes(content)

    return setup


def symlink_out(directory: Path) -> None:
    (directory / "images" / "link.png").symlink_to(SHAPES / "images" / "val_001.png")  # outside the image root


def toml_case(text: str):
    def build(directory: Path) -> list[str]:
        (directory / "run.toml").write_text(text, encoding="utf-8")
        return ["--config", str(directory / "run.toml")]

    return build


PNG = (SHAPES / "images" / "val_000.png").read_bytes()
# class -> (how to build the command's arguments, what the error must name)
CASES = {
    "missing image": (manifest_case([GOOD | {"image": "images/nope.png"}]), "nope.png"),
    "corrupt image": (
        manifest_case([GOOD | {"image": "images/bad.png"}], setup=image_file("bad.png", b"not a png")),
        "bad.png",
    ),
    "truncated image": (
        manifest_case([GOOD | {"image": "images/cut.png"}], setup=image_file("cut.png", PNG[: len(PNG) // 2])),
        "cut.png",
    ),
    "empty answer": (manifest_case([GOOD | {"answer": ""}]), "field 'answer'"),
    "whitespace answer": (manifest_case([GOOD | {"answer": "  \t"}]), "field 'answer'"),
    "missing field": (manifest_case([{"image": GOOD["image"], "instruction": "q"}]), "field 'answer'"),
    "mistyped field name": (manifest_case([GOOD | {"answers": ["red"]}]), "field 'answers'"),
    "malformed JSON line": (manifest_case(raw=b'{"image": "images/val_000.png",\n'), "m.jsonl:1"),
    "manifest not UTF-8": (manifest_case(raw=json.dumps(GOOD).encode().replace(b"red", b"r\xffd")), "not UTF-8"),
    "duplicate ids": (manifest_case([GOOD | {"id": "a"}, GOOD | {"id": "a"}]), "duplicate id 'a'"),
    "path escaping the root": (manifest_case([GOOD | {"image": "../../etc/passwd"}]), "escapes the image root"),
    "absolute path": (manifest_case([GOOD | {"image": "/etc/passwd"}]), "absolute path"),
    "symlink out of the root": (manifest_case([GOOD | {"image": "images/link.png"}], setup=symlink_out), "escapes"),
    "unknown config key": (toml_case("learning_rate = 0.1\n"), "unknown option 'learning_rate'"),
    "mistyped config value": (toml_case('lr = "fast"\n'), "option 'lr' expects float"),
    "NaN in a numeric option": (toml_case("lr = nan\n"), "option 'lr' is nan; it must be a finite number"),
    "infinity in a numeric option": (toml_case("max_grad_norm = inf\n"), "must be a finite number"),
    "a count below its minimum": (toml_case("batch_size = 0\n"), "option 'batch_size' is 0; it must be at least 1"),
}


LAZY = ("corrupt image", "truncated image")  # decoded in the loader, not when the manifest is read


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_and_nothing_on_disk_is_lost(case, finished, tmp_path, capsys):
    build, named = CASES[case]
    earlier = tmp_path / "earlier"
    shutil.copytree(finished, earlier)
    before = files_of(earlier)
    args = build(tmp_path)
    fresh = tmp_path / "fresh"
    targets = [[str(fresh)]] + ([] if case in LAZY else [[str(earlier), "--overwrite", "true"]])
    for out in targets:
        code = cli.main(["train", *args, "--epochs", "1", "--output-dir", *out, "--progress", "false"])
        err = capsys.readouterr().err
        assert code == 2 and named in err, f"{case}: exit {code}, stderr: {err[-600:]}"
    assert files_of(earlier) == before, f"{case}: the earlier run changed"
    assert not fresh.exists() or not list(checkpoint.list_checkpoints(fresh)), f"{case}: a run was half-written"


@pytest.mark.parametrize(
    ("option", "value"),
    [("lora_r", "4"), ("targets", "query,value"), ("base_checkpoint", "other-base")],
    ids=["another LoRA rank", "another target set", "another base checkpoint"],
)
def test_a_checkpoint_of_another_setup_is_refused_by_name(finished, tmp_path, capsys, option, value):
    if value == "other-base":  # a base checkpoint elsewhere: the run's checkpoint was not trained on it
        value = str(shutil.copytree(TINY_BASE_CHECKPOINT, tmp_path / "other-base"))
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = files_of(run)
    flag = f"--{option.replace('_', '-')}"
    args = [
        "train",
        "--output-dir",
        str(run),
        "--epochs",
        "2",
        flag,
        value,
        "--resume",
        "latest",
        "--progress",
        "false",
    ]
    assert cli.main(args) == 2
    assert option in capsys.readouterr().err
    assert files_of(run) == before
