"""qformer_lora.formats: every importable dataset format, on the fixtures in fixtures/formats/.

The fixtures (scripts/make_format_fixtures.py) are 32x32 pictures of four flat-colour quadrants,
with questions, answers and captions about those colours; each expected value below is read off
the fixture files named in the test. Bad inputs are copies of a fixture, changed in tmp_path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from qformer_lora import checkpoint, data, formats, inputs
from qformer_lora.formats import coco, hf, scienceqa
from qformer_lora.training import run_config, train

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "fixtures" / "formats"
SCRIPT = REPO_ROOT / "scripts" / "make_format_fixtures.py"
LLAVA = FIXTURES / "llava" / "llava_v1_5_mix665k.json"
COCO = FIXTURES / "coco" / "annotations" / "captions_val2014.json"
VQA_QUESTIONS = FIXTURES / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
VQA_ANNOTATIONS = FIXTURES / "vqav2" / "v2_mscoco_val2014_annotations.json"
PROBLEMS = FIXTURES / "scienceqa" / "problems.json"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """load_dataset converts files into its cache: a temporary one, not the user's ~/.cache."""
    try:
        import datasets
    except ImportError:
        return
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))


def read_quietly(*args, **kwargs) -> tuple[list[data.Sample], list[str]]:
    """formats.read and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = formats.read(*args, **kwargs)
    return samples, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


# --------------------------------------------------------------------------- mappings


def test_jsonl_is_read_by_read_manifest():
    path = FIXTURES / "jsonl" / "train.jsonl"
    assert formats.detect(path) == "jsonl"
    assert formats.read(path) == data.read_manifest(path)
    # train.jsonl line 1: img_000.png (red-blue: red top half) asked its top left quadrant
    first = formats.read(path)[0]
    assert (first.image_path.name, first.instruction, first.answer) == (
        "img_000.png",
        "What colour is the top left quadrant?",
        "red",
    )


def test_llava_one_sample_per_pair_without_the_image_token():
    """llava_v1_5_mix665k.json: records 000000000009 (one pair), 000000000025 (two pairs, <image> after
    the question), sharegpt-0 (no image: skipped), 000000000030 (one pair) -> 4 samples."""
    samples, warned = read_quietly(LLAVA)
    assert [s.id for s in samples] == ["000000000009:0", "000000000025:0", "000000000025:1", "000000000030:0"]
    assert [(s.instruction, s.answer) for s in samples] == [
        ("What colour is the top left quadrant?", "It is red."),  # "<image>\n" + question
        ("What colour is the top left quadrant?", "It is green."),  # question + "\n<image>"
        ("What colour is the top right quadrant?", "It is yellow."),
        ("Describe the picture briefly.", "A black and white checkerboard."),
    ]
    assert (
        samples[1].image_path == samples[2].image_path == (LLAVA.parent / "coco/train2017/000000000025.jpg").resolve()
    )
    assert [s.record for s in samples][-1] == "record 4 (id '000000000030')"
    assert warned == [f"{LLAVA}: 1 of 4 records have no image and were skipped"]


def test_llava_repeated_record_ids_stay_unique(tmp_path):
    # LLaVA-Instruct-150K gives up to three records one COCO image id
    path = copy_fixture("llava", tmp_path) / "llava_v1_5_mix665k.json"
    edit_json(path, lambda d: d[3].update(id="000000000009"))
    samples, _ = read_quietly(path)
    assert [s.id for s in samples][-1] == "000000000009#4:0"
    assert len({s.id for s in samples}) == len(samples)


def test_coco_one_sample_per_caption_all_captions_kept():
    """captions_val2014.json lists 2 captions for each of the images 42, 73, 74, interleaved
    (annotation ids 142, 173, 174, then 242, 273, 274), with a trailing space or newline."""
    samples = formats.read(COCO)
    assert [s.id for s in samples] == ["142", "173", "174", "242", "273", "274"]
    assert {s.instruction for s in samples} == {coco.CAPTION_INSTRUCTION} == {"A short image description:"}
    by_id = {s.id: s for s in samples}
    assert by_id["142"].answer == "A red half above a blue half."  # "... half. " stripped
    assert by_id["242"].answer == "A picture in blue and red."  # "...red.\n" stripped
    assert (
        by_id["142"].answers == by_id["242"].answers == ("A red half above a blue half.", "A picture in blue and red.")
    )
    # the official layout: annotations/ beside val2014/
    assert by_id["173"].image_path == (FIXTURES / "coco" / "val2014" / "COCO_val2014_000000000073.jpg").resolve()


def test_vqav2_answer_is_the_multiple_choice_answer_and_the_ten_are_kept():
    """Question 42000 asks the top left of image 42 (red-blue): eight annotators say red, two blue."""
    samples = formats.read(VQA_QUESTIONS)
    assert formats.read(VQA_ANNOTATIONS) == samples  # either file of the pair names it
    assert [s.id for s in samples] == ["42000", "42001", "73000", "74000"]
    first = samples[0]
    assert (first.instruction, first.answer) == ("What colour is the top left quadrant?", "red")
    assert first.answers == ("red",) * 8 + ("blue",) * 2
    assert first.image_path == (FIXTURES / "vqav2" / "val2014" / "COCO_val2014_000000000042.jpg").resolve()
    assert [s.answer for s in samples] == ["red", "blue", "red", "blue"]


def test_scienceqa_options_in_the_instruction_choices_kept():
    """problems.json: train has pids 1 (image), 2 (no image), 3 (image, with a hint); val has 4 (image), 5 (none).
    Pid 3: choices yellow/black/white, answer 1 -> "black"."""
    train_samples, warned = read_quietly(PROBLEMS, split="train")
    assert [s.id for s in train_samples] == ["1", "3"]
    assert warned == [f"{PROBLEMS}: 1 of 3 problems of split 'train' have no image and were skipped"]
    third = train_samples[1]
    assert third.instruction == (
        "Context: Look at the bottom right quadrant. Question: Which colour is it? "
        "Options: (A) yellow (B) black (C) white Answer:"
    )
    assert (third.answer, third.choices, third.answer_index) == ("black", ("yellow", "black", "white"), 1)
    assert third.image_path == (PROBLEMS.parent / "images" / "train" / "3" / "image.png").resolve()
    assert train_samples[0].instruction.startswith("Context: N/A Question:")  # no hint
    val_samples, _ = read_quietly(PROBLEMS, split="validation")  # an alias of "val"
    assert [(s.id, s.answer) for s in val_samples] == [("4", "blue")]
    every, warned = read_quietly(PROBLEMS)
    assert [s.id for s in every] == ["1", "3", "4"] and "2 of 5 problems" in warned[0]


def test_scienceqa_template_letters_every_option():
    assert scienceqa.instruction("Q?", ("a", "b")) == "Context: N/A Question: Q? Options: (A) a (B) b Answer:"


def test_hf_imagefolder_splits():
    """hf/train/metadata.jsonl: 3 rows (answers red, yellow, black); hf/validation: 2 (blue, red)."""
    pytest.importorskip("datasets")
    path = FIXTURES / "hf"
    assert formats.detect(path) == "hf"
    train_samples = formats.read(path, split="train")
    assert [(s.id, s.instruction, s.answer) for s in train_samples] == [
        ("hf/train:0", "What colour is the top left quadrant?", "red"),
        ("hf/train:1", "What colour is the top right quadrant?", "yellow"),
        ("hf/train:2", "What colour is the bottom left quadrant?", "black"),
    ]
    assert train_samples[0].image_path == (path / "train" / "0000.png").resolve()
    assert train_samples[0].image_ref is None  # a file: loaded like a manifest's image
    assert [s.answer for s in formats.read(path, split="val")] == ["blue", "red"]  # "validation"
    assert [s.answer for s in formats.read(path / "validation", split="train")] == ["blue", "red"]  # one split
    with pytest.raises(formats.FormatError, match="holds the splits train, validation"):
        formats.read(path)


def embedded_dataset(tmp_path: Path):
    """The hf fixture as a DatasetDict whose image column holds the PNG bytes (as Hub parquet does)."""
    datasets = pytest.importorskip("datasets")
    splits = {}
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (FIXTURES / "hf" / split / "metadata.jsonl").read_text().splitlines()]
        images = [{"bytes": (FIXTURES / "hf" / split / r["file_name"]).read_bytes(), "path": None} for r in rows]
        features = datasets.Features(
            image=datasets.Image(), question=datasets.Value("string"), answer=datasets.Value("string")
        )
        columns = {"image": images, "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]}
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return datasets.DatasetDict(splits)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_embedded_images_load_lazily_and_pickle_small(tmp_path, layout):
    dataset = embedded_dataset(tmp_path)
    if layout == "save_to_disk":
        path = tmp_path / "saved"
        dataset.save_to_disk(str(path))
    else:
        path = tmp_path / "train-00000-of-00001.parquet"
        dataset["train"].to_parquet(str(path))
    samples = formats.read(path, split="train")
    png = FIXTURES / "hf" / "train" / "0001.png"  # row 1
    assert [s.answer for s in samples] == ["red", "yellow", "black"]
    assert isinstance(samples[1].image_ref, hf.HFImage) and samples[1].image_ref.row == 1
    # a worker receives the reference, not the picture: the pickled sample is smaller than the PNG (3.2 kB)
    assert len(pickle.dumps(samples[1])) < png.stat().st_size
    dataset_copy = pickle.loads(pickle.dumps(data.ManifestDataset(samples)))
    hf._OPENED.clear()  # as in a fresh worker process: the dataset is reopened from its path
    example = dataset_copy[1]
    assert example.image.tobytes() == data.load_image(png).tobytes()
    assert (example.instruction, example.answer) == ("What colour is the top right quadrant?", "yellow")


def test_hf_string_paths_and_column_names(tmp_path):
    """A JSON-lines table: image paths relative to its folder, the instruction under "prompt"."""
    pytest.importorskip("datasets")
    folder = copy_fixture("jsonl", tmp_path)
    rows = [{"image": "images/img_001.png", "prompt": "Which colour is on the right?", "response": "yellow"}]
    (folder / "table.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert formats.detect(folder / "table.jsonl") == "hf"  # names the instruction "prompt", not "instruction"
    [sample] = formats.read(folder / "table.jsonl")
    assert (sample.image_path, sample.instruction, sample.answer) == (
        (folder / "images" / "img_001.png").resolve(),
        "Which colour is on the right?",
        "yellow",
    )


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (FIXTURES / "jsonl" / "val.jsonl", "jsonl"),
        (LLAVA, "llava"),
        (FIXTURES / "hf", "hf"),
        (FIXTURES / "hf" / "train" / "metadata.jsonl", "hf"),
        (COCO, "coco"),
        (VQA_QUESTIONS, "vqav2"),
        (VQA_ANNOTATIONS, "vqav2"),
        (PROBLEMS, "scienceqa"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.relative_to(FIXTURES).as_posix(),
)
def test_detect_by_path(path, expected):
    assert formats.detect(path) == expected


@pytest.mark.parametrize(
    ("source", "expected"), [(LLAVA, "llava"), (COCO, "coco"), (VQA_QUESTIONS, "vqav2"), (PROBLEMS, "scienceqa")]
)
def test_detect_by_content_when_renamed(tmp_path, source, expected):
    renamed = tmp_path / "data.json"
    shutil.copy(source, renamed)
    assert formats.detect(renamed) == expected


@pytest.mark.parametrize(("name", "content"), [("data.json", "{}"), ("data.csv", "a,b\n"), ("missing.json", None)])
def test_undetectable_paths_name_the_rules(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(formats.FormatError) as err:
        formats.detect(path)
    assert str(path) in str(err.value)
    assert content is None or "--data-format" in str(err.value) and "captions_*.json -> coco" in str(err.value)


def test_a_mistyped_manifest_is_still_explained_by_read_manifest(tmp_path):
    # a typo must not send a manifest to the hf reader: read_manifest names the line and the key
    folder = copy_fixture("jsonl", tmp_path)
    (folder / "typo.jsonl").write_text(json.dumps({"image": "images/img_000.png", "instructions": "Q?", "answer": "a"}))
    with pytest.raises(data.ManifestError, match=r"typo\.jsonl:1: field 'instructions': unknown key"):
        formats.read(folder / "typo.jsonl")


def test_unknown_format_name_is_refused():
    with pytest.raises(formats.FormatError, match="unknown data format 'csv'"):
        formats.read(COCO, data_format="csv")
    with pytest.raises(run_config.ConfigError, match="data_format"):
        run_config.load_run_config(None, {"data_format": "csv"})


# --------------------------------------------------------------------------- bad records


def _llava_bad_role(folder):
    edit_json(folder / "llava_v1_5_mix665k.json", lambda d: d[0]["conversations"][1].update({"from": "assistant"}))


def _llava_unanswered(folder):
    edit_json(folder / "llava_v1_5_mix665k.json", lambda d: d[1]["conversations"].pop())


def _llava_escape(folder):
    edit_json(folder / "llava_v1_5_mix665k.json", lambda d: d[3].update(image="../../outside.jpg"))


def _coco_no_caption(folder):
    edit_json(folder / "annotations" / "captions_val2014.json", lambda d: d["annotations"][1].pop("caption"))


def _coco_unknown_image(folder):
    edit_json(folder / "annotations" / "captions_val2014.json", lambda d: d["annotations"][2].update(image_id=7))


def _coco_no_annotations(folder):
    edit_json(folder / "annotations" / "captions_val2014.json", lambda d: d.pop("annotations"))


def _vqa_no_answer(folder):
    path = folder / "v2_mscoco_val2014_annotations.json"
    edit_json(path, lambda d: d["annotations"][0].pop("multiple_choice_answer"))


def _vqa_unannotated(folder):
    path = folder / "v2_OpenEnded_mscoco_val2014_questions.json"
    edit_json(path, lambda d: d["questions"][3].update(question_id=99))


def _vqa_missing_image(folder):
    (folder / "val2014" / "COCO_val2014_000000000073.jpg").unlink()


def _sqa_answer_out_of_range(folder):
    edit_json(folder / "problems.json", lambda d: d["3"].update(answer=3))


def _sqa_choices_not_a_list(folder):
    edit_json(folder / "problems.json", lambda d: d["1"].update(choices="red or blue"))


# (fixture, change, file to read, split, what the message must name: the file, the record, the field)
BAD = {
    "llava role": ("llava", _llava_bad_role, "llava_v1_5_mix665k.json", None,
                   ["record 1 (id '000000000009')", "conversations[1]", "field 'from'"]),
    "llava unanswered": ("llava", _llava_unanswered, "llava_v1_5_mix665k.json", None,
                         ["record 2 (id '000000000025')", "field 'conversations'", "3 turns"]),
    "llava escape": ("llava", _llava_escape, "llava_v1_5_mix665k.json", None,
                     ["record 4 (id '000000000030')", "field 'image'", "escapes the image root"]),
    "coco caption": ("coco", _coco_no_caption, "annotations/captions_val2014.json", None,
                     ["annotation 2 (id 173)", "field 'caption'", "missing"]),
    "coco image_id": ("coco", _coco_unknown_image, "annotations/captions_val2014.json", None,
                      ["annotation 3 (id 174)", "field 'image_id'", "7 is not in"]),
    "coco annotations": ("coco", _coco_no_annotations, "annotations/captions_val2014.json", None,
                         ["top level", "field 'annotations'", "missing"]),
    "vqav2 answer": ("vqav2", _vqa_no_answer, "v2_mscoco_val2014_annotations.json", None,
                     ["annotation 1 (question_id 42000)", "field 'multiple_choice_answer'"]),
    "vqav2 question_id": ("vqav2", _vqa_unannotated, "v2_OpenEnded_mscoco_val2014_questions.json", None,
                          ["question 4 (question_id 99)", "field 'question_id'", "no annotation"]),
    "vqav2 image": ("vqav2", _vqa_missing_image, "v2_OpenEnded_mscoco_val2014_questions.json", None,
                    ["question 3 (question_id 73000)", "field 'image'", "COCO_val2014_000000000073.jpg"]),
    "scienceqa answer": ("scienceqa", _sqa_answer_out_of_range, "problems.json", "train",
                         ["problem '3'", "field 'answer'", "index 3 is outside the 3 choices"]),
    "scienceqa choices": ("scienceqa", _sqa_choices_not_a_list, "problems.json", "train",
                          ["problem '1'", "field 'choices'", "expected list"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_record_names_file_record_and_field(tmp_path, case):
    fixture, change, name, split, expected = BAD[case]
    folder = copy_fixture(fixture, tmp_path)
    change(folder)
    # the message names the file that holds the record (vqav2: the annotations file for an annotation)
    holder = folder / ("v2_mscoco_val2014_annotations.json" if case == "vqav2 answer" else name)
    with pytest.raises(data.ManifestError) as err:
        read_quietly(folder / name, split=split)
    message = str(err.value)
    assert message.startswith(str(holder)), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_an_undecodable_image_names_the_record_that_gave_it(tmp_path):
    # images are decoded lazily, in the dataset: the error still names annotation file and record
    folder = copy_fixture("coco", tmp_path)
    (folder / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"not a jpeg")
    dataset = data.ManifestDataset(formats.read(folder / "annotations" / "captions_val2014.json"))
    with pytest.raises(data.ImageLoadError) as err:
        dataset[0]
    assert str(err.value).startswith(f"{folder / 'annotations' / 'captions_val2014.json'}: annotation 1 (id 142): ")
    assert "COCO_val2014_000000000042.jpg" in str(err.value)


def test_hf_bad_rows_and_columns_are_named(tmp_path):
    pytest.importorskip("datasets")
    folder = copy_fixture("hf", tmp_path)
    rows = (folder / "train" / "metadata.jsonl").read_text().splitlines()
    (folder / "train" / "metadata.jsonl").write_text(
        rows[0] + "\n" + rows[1].replace('"answer": "yellow"', '"answer": ""') + "\n"
    )
    with pytest.raises(data.ManifestError, match=r"hf \(split 'train'\): row 1: column 'answer': expected a non-empty"):
        formats.read(folder, split="train")
    (folder / "train" / "metadata.jsonl").write_text(rows[0].replace('"answer"', '"label"') + "\n")
    with pytest.raises(data.ManifestError) as err:
        formats.read(folder / "train")  # one split: the other's columns would differ, which datasets refuses
    assert "no answer column (looked for answer, response" in str(err.value)
    assert "columns: image, question, label" in str(err.value)


def test_hf_refuses_paths_leaving_the_image_root(tmp_path):
    pytest.importorskip("datasets")
    folder = copy_fixture("jsonl", tmp_path)
    (folder / "table.jsonl").write_text(json.dumps({"image": "../../x.png", "question": "Q?", "answer": "a"}) + "\n")
    with pytest.raises(data.ManifestError, match=r"row 0: column 'image': field 'image': path '../../x.png' escapes"):
        formats.read(folder / "table.jsonl")


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(formats.FormatError, match=r"pip install 'qformer-lora\[datasets\]'"):
        formats.read(FIXTURES / "hf", split="train")


def test_vqav2_test_split_without_annotations_is_refused(tmp_path):
    questions = tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json"
    shutil.copy(VQA_QUESTIONS, questions)
    with pytest.raises(formats.FormatError, match="v2_mscoco_test2015_annotations.json does not exist.*test splits"):
        formats.read(questions)


# --------------------------------------------------------------------------- training on every format


def _saved_embedded(tmp_path: Path) -> str:
    path = tmp_path / "embedded"
    embedded_dataset(tmp_path).save_to_disk(str(path))
    return str(path)


# format -> (train source, val source, samples trained, majority-answer share of the val answers)
# jsonl: train.jsonl 3 lines; val.jsonl answers red, blue -> 1/2
# llava: 4 samples (see above) in both roles; 4 different answers -> 1/4
# hf: train split 3 rows; validation answers blue, red -> 1/2 (hf-embedded: the same rows as bytes)
# coco: 6 captions in both roles, all different -> 1/6
# vqav2: 4 questions in both roles; answers red, blue, red, blue -> 1/2
# scienceqa: train split pids 1, 3; val split pid 4 alone -> 1
TRAINING = {
    "jsonl": (FIXTURES / "jsonl" / "train.jsonl", FIXTURES / "jsonl" / "val.jsonl", 3, 1 / 2),
    "llava": (LLAVA, LLAVA, 4, 1 / 4),
    "hf": (FIXTURES / "hf", FIXTURES / "hf", 3, 1 / 2),
    "hf-embedded": (_saved_embedded, _saved_embedded, 3, 1 / 2),
    "coco": (COCO, COCO, 6, 1 / 6),
    "vqav2": (VQA_QUESTIONS, VQA_ANNOTATIONS, 4, 1 / 2),
    "scienceqa": (PROBLEMS, PROBLEMS, 2, 1.0),
}


@pytest.mark.parametrize("case", list(TRAINING))
def test_each_format_trains_one_epoch(tmp_path, case):
    train_source, val_source, trained, baseline = TRAINING[case]
    if case.startswith("hf"):
        pytest.importorskip("datasets")
    if callable(train_source):
        train_source = val_source = train_source(tmp_path)
    run = tmp_path / "run"
    batch_size = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skipped-record counts, checked above
        metrics = train.train(
            train.TrainConfig(
                train_manifest=str(train_source),
                val_manifest=str(val_source),
                data_format=case.removesuffix("-embedded"),
                epochs=1,
                batch_size=batch_size,
                max_prompt_tokens=64,  # ScienceQA's options, whole
                max_answer_tokens=16,  # COCO's captions, whole
                output_dir=str(run),
                progress=False,
            )
        )
    assert metrics["step"] == math.ceil(trained / batch_size)  # the train split, all of it, nothing else
    assert metrics["majority_baseline"] == pytest.approx(baseline)  # the val split
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    adapter = checkpoint.checkpoint_dir(run, 1) / checkpoint.ADAPTER_DIR / "adapter_model.safetensors"
    assert adapter.is_file() and (run / "metrics.jsonl").is_file()


def test_the_train_flag_takes_a_format():
    from qformer_lora import cli

    args = cli.build_parser().parse_args(["train", "--train-manifest", str(COCO), "--data-format", "coco"])
    assert args.data_format == "coco"
    assert train.TrainConfig().data_format == "auto"


# --------------------------------------------------------------------------- the fixtures


def test_fixture_script_check_passes():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, f"make_format_fixtures.py --check failed:\n{result.stdout}\n{result.stderr}"


def test_fixture_check_detects_a_changed_file(tmp_path):
    copy = Path(shutil.copytree(FIXTURES, tmp_path / "formats"))
    (copy / "coco" / "annotations" / "captions_val2014.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "captions_val2014.json" in result.stderr, result.stdout + result.stderr


def test_fixtures_are_small():
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 300_000, f"fixtures/formats holds {size} bytes"


def test_the_handmade_jpegs_decode_to_their_colours():
    """COCO_val2014_000000000042.jpg is red-blue: red (220, 30, 30) above blue (30, 60, 220); a flat
    8x8 block survives JPEG exactly, so only YCbCr rounding (1 level) separates the decoded pixels."""
    image = Image.open(io.BytesIO((FIXTURES / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes()))
    assert (image.format, image.size) == ("JPEG", (32, 32))
    for (x, y), colour in {(3, 3): (220, 30, 30), (28, 28): (30, 60, 220)}.items():
        assert max(abs(a - b) for a, b in zip(image.convert("RGB").getpixel((x, y)), colour)) <= 1


def test_embedded_images_reach_dataloader_workers_unchanged(tmp_path):
    """The (source, row, column) references pickle into worker processes, which reopen the dataset:
    two workers give the batches the main process gives (training/loader.py)."""
    from qformer_lora.training.loader import EpochLoader

    samples = formats.read(_saved_embedded(tmp_path), "hf", split="train")
    processor = data.build_processor("instructblip", image_size=32)
    collator = inputs.Collator(processor, family="instructblip", decoder_only=False)
    dataset = data.ManifestDataset(samples)
    batches = [
        list(EpochLoader(dataset, collator, batch_size=2, seed=0, shuffle=True, num_workers=workers).epoch(1))
        for workers in (0, 2)
    ]
    assert len(batches[0]) == 2  # 3 rows at batch 2
    for main, worker in zip(*batches):
        assert torch.equal(main["pixel_values"], worker["pixel_values"]) and main["ids"] == worker["ids"]


def test_generate_reads_any_format(tmp_path, capsys):
    """generate answers a run's own validation data in the run's format, and --manifest in any format."""
    from qformer_lora import cli

    run = tmp_path / "run"
    config = train.TrainConfig(
        train_manifest=str(VQA_QUESTIONS), val_manifest=str(VQA_QUESTIONS), data_format="vqav2", epochs=1
    )
    train.train(dataclasses.replace(config, batch_size=2, output_dir=str(run), progress=False))
    capsys.readouterr()
    assert cli.main(["generate", str(run), "--limit", "3"]) == 0
    expected = [s.answer for s in formats.read(VQA_QUESTIONS, "vqav2")[:3]]  # red, blue, red (the fixture)
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit("(expected: ", 1)[1].rstrip(")") for line in lines] == expected
    assert cli.main(["generate", str(run), "--manifest", str(COCO), "--limit", "2"]) == 0  # detected: coco
    assert all("A short image description:" in line for line in capsys.readouterr().out.splitlines())
