"""ScienceQA -> Samples: multiple choice, the instruction lists the options, the answer is the chosen text.

The official layout (github.com/lupantech/ScienceQA: data/scienceqa, tools/download.sh)::

    problems.json          {"<pid>": {"question", "choices": [...], "answer": <index>, "hint",
                                      "image": "image.png" | null, "split": "train" | "val" | "test" | ...}}
    pid_splits.json        (the same splits as lists of pids; not needed: each problem names its split)
    images/<split>/<pid>/image.png

The image folder defaults to ``images/`` next to ``problems.json``; ``--image-root`` names another.
``split`` keeps the problems of that split (``val`` also matches ``validation``; training reads
"train" from --train-manifest and "val" from --val-manifest); None keeps every problem.

Mapping, per problem: instruction = ``TEMPLATE`` filled in, answer = ``choices[answer]``,
``choices`` and ``answer_index`` kept (for rank scoring later), id = the pid.

Problems without an image (about half of ScienceQA) are skipped with one warning counting
them, not refused: refusing would make the dataset unusable, and this model always conditions
on an image (inventing a blank one would teach it to ignore the picture).
"""

from __future__ import annotations

import string
import warnings
from pathlib import Path

from .. import data
from .common import FormatError, ImageRoot, field, load_json, split_names

# ScienceQA's own "CQM" prompt (lupantech/ScienceQA, models/base_prompt.py: context, question,
# options as "(A) ... (B) ...", an empty context written "N/A"), on one line. InstructBLIP
# evaluated ScienceQA with a template of the same parts in the same order (Dai et al. 2023,
# arXiv:2305.06500, appendix); its exact wording could not be checked offline.
TEMPLATE = "Context: {context} Question: {question} Options: {options} Answer:"
LETTERS = string.ascii_uppercase


def instruction(question: str, choices: tuple[str, ...], hint: str = "") -> str:
    """The instruction for one problem: ``TEMPLATE`` with the options lettered (A), (B), ..."""
    options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(choices))
    return TEMPLATE.format(context=hint.strip() or "N/A", question=question.strip(), options=options)


def read(path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> list[data.Sample]:
    """Samples of ``problems.json`` (those of ``split``, with an image).

    Raises FormatError (a data.ManifestError) naming the file, the problem and the field."""
    path = Path(path)
    problems = load_json(path)
    if not isinstance(problems, dict):
        raise FormatError(
            f"{path}: top level: expected an object of problems keyed by pid, got {type(problems).__name__}"
        )
    root = ImageRoot(image_root if image_root is not None else path.parent / "images", f"images of {path.name}")
    wanted = None if split is None else set(split_names(split))
    samples, without_image, splits = [], 0, set()
    for number, (pid, problem) in enumerate(problems.items(), start=1):
        locator = f"problem {pid!r}"
        where = f"{path}: {locator}"
        problem_split = field(problem, "split", str, where)
        splits.add(problem_split)
        if wanted is not None and problem_split not in wanted:
            continue
        choices, answer_index = _choices(problem, where)
        text = instruction(field(problem, "question", str, where), choices, _hint(problem, where))
        if problem.get("image") is None:
            without_image += 1
            field(problem, "image", type(None), where)  # present and null, or missing: raise for a missing key
            continue
        image = root.resolve(f"{problem_split}/{pid}/{field(problem, 'image', str, where)}", where)
        samples.append(
            data.Sample(
                str(pid),
                image,
                text,
                choices[answer_index],
                number,
                path,
                choices=choices,
                answer_index=answer_index,
                record=locator,
            )  # fmt: skip
        )
    if without_image:  # stacklevel 3: the caller of formats.read
        which = "" if split is None else f" of split {split!r}"
        total = without_image + len(samples)
        warnings.warn(
            f"{path}: {without_image} of {total} problems{which} have no image and were skipped", stacklevel=3
        )
    if not samples:
        which = "" if split is None else f" in split {split!r} (splits here: {', '.join(sorted(splits))})"
        raise FormatError(f"{path}: no problem with an image{which}")
    return samples


def _choices(problem: dict, where: str) -> tuple[tuple[str, ...], int]:
    """(the options, the answer's index among them), checked."""
    choices = field(problem, "choices", list, where)
    if len(choices) < 2:
        raise FormatError(f"{where}: field 'choices': {len(choices)} option(s); a multiple-choice question needs 2+")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise FormatError(f"{where}: field 'choices': option {i} is {choice!r}, expected a non-empty string")
    answer = field(problem, "answer", int, where)
    if not 0 <= answer < len(choices):
        raise FormatError(f"{where}: field 'answer': index {answer} is outside the {len(choices)} choices")
    return tuple(choices), answer


def _hint(problem: dict, where: str) -> str:
    """The problem's context (``hint``; empty or absent when there is none)."""
    hint = problem.get("hint", "")
    if not isinstance(hint, str):
        raise FormatError(f"{where}: field 'hint': expected str, got {type(hint).__name__}")
    return hint
