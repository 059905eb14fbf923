"""VQAv2 -> Samples: one per question, answer = ``multiple_choice_answer``, all ten answers kept.

The official layout (visualqa.org/download.html; images are COCO's)::

    v2_OpenEnded_mscoco_val2014_questions.json   {"data_subtype": "val2014",
                                                  "questions": [{"image_id", "question", "question_id"}], ...}
    v2_mscoco_val2014_annotations.json           {"annotations": [{"question_id", "image_id",
                                                  "multiple_choice_answer", "answers": [{"answer", ...} x 10],
                                                  ...}], ...}
    val2014/COCO_val2014_000000000042.jpg        COCO_<data_subtype>_<image_id, 12 digits>.jpg

Either JSON file may be named; the other is found next to it by the official names. The image
folder defaults to ``<their folder>/<data_subtype>``; ``--image-root`` names another (the folder
holding the ``COCO_*.jpg`` files). The test splits publish no annotations and are refused.

Mapping, per question: instruction = the question as written, answer = the annotation's
``multiple_choice_answer`` (the most frequent of the ten human answers), ``answers`` = the ten
``answers[].answer`` in file order (for the VQA accuracy min(#matches / 3, 1) later),
id = the question id.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import data
from .common import FormatError, ImageRoot, field, load_json, records

QUESTIONS = re.compile(r"v2_OpenEnded_mscoco_(?P<subtype>\w+)_questions\.json")
ANNOTATIONS = re.compile(r"v2_mscoco_(?P<subtype>\w+)_annotations\.json")


def files(path: Path) -> tuple[Path, Path]:
    """(questions file, annotations file) for either of the two official names; FormatError otherwise."""
    if match := QUESTIONS.fullmatch(path.name):
        pair = path, path.with_name(f"v2_mscoco_{match['subtype']}_annotations.json")
    elif match := ANNOTATIONS.fullmatch(path.name):
        pair = path.with_name(f"v2_OpenEnded_mscoco_{match['subtype']}_questions.json"), path
    else:
        raise FormatError(
            f"{path}: not an official VQAv2 file name (v2_OpenEnded_mscoco_<subtype>_questions.json or "
            f"v2_mscoco_<subtype>_annotations.json); the pair is found by these names"
        )
    missing = [p for p in pair if not p.is_file()]
    if missing:
        why = " (the test splits publish no answers; training and validation need them)" if "test" in path.name else ""
        raise FormatError(f"{path}: its pair {missing[0]} does not exist{why}")
    return pair


def read(path: str | Path, image_root: str | Path | None = None, split: str | None = None) -> list[data.Sample]:
    """Samples of a VQAv2 questions + annotations pair; ``split`` is ignored (a pair is one split).

    Raises FormatError (a data.ManifestError) naming the file, the question and the field."""
    questions_path, annotations_path = files(Path(path))
    questions = load_json(questions_path)
    subtype = field(questions, "data_subtype", str, f"{questions_path}: top level")
    root = ImageRoot(
        image_root if image_root is not None else questions_path.parent / subtype,
        f"COCO_{subtype}_*.jpg images of {questions_path.name}",
    )
    answers = _annotations(annotations_path)
    samples = []
    for number, question in enumerate(records(questions, "questions", questions_path), start=1):
        where = f"{questions_path}: question {number}"
        question_id = field(question, "question_id", int, where)
        locator = f"question {number} (question_id {question_id})"
        where = f"{questions_path}: {locator}"
        image_id = field(question, "image_id", int, where)
        if question_id not in answers:
            raise FormatError(f"{where}: field 'question_id': no annotation in {annotations_path.name}")
        annotation_image, answer, all_answers = answers[question_id]
        if annotation_image != image_id:
            raise FormatError(
                f"{where}: field 'image_id': {image_id}, but its annotation in {annotations_path.name} says "
                f"{annotation_image}"
            )
        image = root.resolve(f"COCO_{subtype}_{image_id:012d}.jpg", f"{where} (image_id {image_id})")
        text = field(question, "question", str, where)
        samples.append(
            data.Sample(
                str(question_id), image, text, answer, number, questions_path, answers=all_answers, record=locator
            )
        )
    if not samples:
        raise FormatError(f"{questions_path}: field 'questions': no questions")
    return samples


def _annotations(path: Path) -> dict[int, tuple[int, str, tuple[str, ...]]]:
    """question id -> (image id, multiple-choice answer, the ten answers), checked."""
    found = {}
    for number, annotation in enumerate(records(load_json(path), "annotations", path), start=1):
        where = f"{path}: annotation {number}"
        question_id = field(annotation, "question_id", int, where)
        where = f"{where} (question_id {question_id})"
        if question_id in found:
            raise FormatError(f"{where}: field 'question_id': a second annotation of this question")
        texts = tuple(
            _answer(a, f"{where}: answers[{i}]") for i, a in enumerate(field(annotation, "answers", list, where))
        )
        found[question_id] = (
            field(annotation, "image_id", int, where),
            field(annotation, "multiple_choice_answer", str, where),
            texts,
        )
    return found


def _answer(entry, where: str) -> str:
    """One of the ten human answers: a string, possibly blank (kept as given: VQA accuracy counts matches)."""
    if isinstance(entry, dict) and isinstance(entry.get("answer"), str):
        return entry["answer"]
    return field(entry, "answer", str, where)  # raises, naming what is wrong
