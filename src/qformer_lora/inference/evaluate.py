"""Task metrics of a trained run or a bare base checkpoint: did my task get better?

The metrics follow from what the data holds (the fields ``formats`` fills in):

=================  ====================================  =========================================
task               data                                  metrics (qformer_lora.metrics)
=================  ====================================  =========================================
qa                 one answer per sample (jsonl, llava,  exact_match
                   hf)
vqa                several human answers (VQAv2's ten)   vqa_accuracy, exact_match
multiple-choice    options and answer index (ScienceQA)  mc_rank_accuracy (each option's likelihood
                                                         as the answer, the highest chosen),
                                                         mc_generation_accuracy, exact_match
captioning         COCO captions                         bleu4, cider_d (one caption generated per
                                                         image, against all its captions)
=================  ====================================  =========================================

Generation goes through inference/generate.py with the run's own input builder, so evaluation
sees what training saw. Results: ``predictions.jsonl`` (one record per sample), ``results.json``
and ``results.md``, written together and atomically (:func:`write`).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .. import data, forward, inputs, metrics
from . import generate

TASKS = ("qa", "vqa", "multiple-choice", "captioning")


def task_of(samples: list[data.Sample], data_format: str) -> str:
    """The task (module docstring) of ``samples`` read in ``data_format``."""
    if data_format == "coco":
        return "captioning"
    if any(s.choices for s in samples):
        return "multiple-choice"
    return "vqa" if any(len(s.answers) > 1 for s in samples) else "qa"


def one_per_image(samples: list[data.Sample]) -> list[data.Sample]:
    """Captioning: COCO has a sample per caption; the first per image, which carries all of them."""
    seen, kept = set(), []
    for s in samples:
        key = (s.image_path, s.image_ref)
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept


def evaluate(model, builder: inputs.Collator, samples, task: str, options=generate.GenerationOptions(), progress=True):
    """(metrics, per-sample predictions) of ``model`` on ``samples`` for ``task``.

    ``options``: decoding (generate.GenerationOptions); batches of ``options.batch_size``.
    Raises images.ImageLoadError naming the record for an image that cannot be decoded.
    """
    if task == "captioning":
        samples = one_per_image(samples)
    dataset = data.ManifestDataset(samples)
    records = []
    for start in tqdm(range(0, len(samples), options.batch_size), disable=not progress, desc="evaluate"):
        examples = [dataset[i] for i in range(start, min(start + options.batch_size, len(samples)))]
        answers = generate.answer(
            model, builder, [e.image for e in examples], [e.instruction for e in examples], options
        )
        ranks = rank_choices(model, builder, examples, samples[start:]) if task == "multiple-choice" else None
        for i, (example, prediction) in enumerate(zip(examples, answers)):
            records.append(_record(samples[start + i], example, prediction, None if ranks is None else ranks[i]))
    return score(records, task), records


def rank_choices(model, builder: inputs.Collator, examples, samples) -> list[list[float]]:
    """Each sample's options scored by their summed answer log-likelihood (forward.answer_log_likelihood)."""
    device = next(model.parameters()).device
    scores = []
    for example, sample in zip(examples, samples):
        candidates = [data.Example(example.image, example.instruction, choice, example.id) for choice in sample.choices]
        batch = inputs.to_device(builder(candidates), device)
        scores.append(forward.answer_log_likelihood(model, batch).float().tolist())
    return scores


def _record(sample: data.Sample, example, prediction: str, choice_scores) -> dict:
    record = {"id": example.id, "instruction": example.instruction, "prediction": prediction, "answer": sample.answer}
    if sample.answers:
        record["answers"] = list(sample.answers)
    if sample.choices:
        record |= {"choices": list(sample.choices), "answer_index": sample.answer_index}
        record["choice_scores"] = choice_scores
        record["rank_choice"] = metrics.choice_by_rank(choice_scores)
        record["generation_choice"] = metrics.choice_by_generation(prediction, sample.choices)
    return record


def score(records: list[dict], task: str) -> dict:
    """The task's metrics over ``records`` (each a value in [0, 1], except CIDEr-D in [0, 10])."""
    count = max(len(records), 1)
    results = {"exact_match": sum(metrics.exact_match(r["prediction"], r["answer"]) for r in records) / count}
    if task == "vqa":
        results["vqa_accuracy"] = sum(metrics.vqa_accuracy(r["prediction"], r["answers"]) for r in records) / count
    if task == "multiple-choice":
        truth = [r["answer_index"] for r in records]
        results["mc_rank_accuracy"] = metrics.multiple_choice_accuracy([r["rank_choice"] for r in records], truth)
        generated = [r["generation_choice"] for r in records]
        results["mc_generation_accuracy"] = metrics.multiple_choice_accuracy(generated, truth)
    if task == "captioning":
        predictions = {r["id"]: r["prediction"] for r in records}
        references = {r["id"]: r.get("answers") or [r["answer"]] for r in records}
        captions = metrics.caption_scores(predictions, references)
        results |= {"bleu4": captions.bleu4, "cider_d": captions.cider_d, "caption_tokenizer": captions.tokenizer}
    return results


def report(results: dict, *, task: str, samples: int, source: str, data_path: str, options) -> dict:
    """The results.json document: the metrics and everything needed to reproduce them."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": source,
        "data": data_path,
        "task": task,
        "samples": samples,
        "generation": asdict(options),
        "metrics": results,
    }


def markdown(document: dict) -> str:
    rows = [f"| {name} | {value:.4f} |" for name, value in document["metrics"].items() if isinstance(value, float)]
    header = [
        f"# Evaluation of {document['model']}",
        "",
        f"{document['samples']} samples of {document['data']} ({document['task']}), {document['created']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


def write(out_dir: str | os.PathLike, document: dict, records: list[dict]) -> Path:
    """predictions.jsonl, results.json and results.md into ``out_dir``, all or none (a staging
    directory renamed into place; an existing ``out_dir`` is replaced only once the new one is whole)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        (staging / "predictions.jsonl").write_text(lines, encoding="utf-8")
        (staging / "results.json").write_text(json.dumps(document, indent=1, allow_nan=False), encoding="utf-8")
        (staging / "results.md").write_text(markdown(document), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load(checkpoint_path=None, base_checkpoint=None, budgets: dict | None = None, device="cpu"):
    """(model, input builder, run config or None, name) of a training checkpoint, or of a bare base
    checkpoint with the prompt/answer ``budgets`` given (its zero-shot baseline)."""
    if checkpoint_path is not None:
        model, processor, _, config = generate.load_trained(checkpoint_path)
        name = str(checkpoint_path)
    else:
        model, processor, _ = generate.load_untrained(base_checkpoint)
        config, name = None, f"{base_checkpoint} (base, zero-shot)"
    model.to(device)
    return model, generate.collator(model, processor, config or budgets), config, name
