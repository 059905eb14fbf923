"""Answering and scoring: did my task get better?

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

Generation uses the run's own input builder (inputs.Collator), so evaluation sees what
training saw; training's in-loop evaluation (``--eval-every``) and ``qformer-lora evaluate``
(inference/evaluate.py) share these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from . import data, forward, inputs, metrics


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding options (transformers' ``generate``): greedy when ``num_beams`` is 1.

    ``max_new_tokens``: longest answer in tokens (None: the run's ``max_answer_tokens``, the
    answer budget it was trained with); ``length_penalty``: beam search's exponent on the
    length that divides a beam's log-likelihood (>1 favours longer answers); ``batch_size``:
    samples per forward pass (answers do not depend on it, tests/unit/test_inputs.py).
    """

    max_new_tokens: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    batch_size: int = 16


def answer(model, builder: inputs.Collator, images, instructions, options=GenerationOptions(), progress=False):
    """Answers to ``instructions`` about ``images`` (equal-length lists), decoded, in order."""
    examples = [data.Example(image, text, "", str(i)) for i, (image, text) in enumerate(zip(images, instructions))]
    max_new_tokens = options.max_new_tokens or builder.max_answer_tokens
    answers: list[str] = []
    for start in tqdm(range(0, len(examples), options.batch_size), disable=not progress, desc="generate"):
        batch = builder.prompts(examples[start : start + options.batch_size])
        new_tokens = forward.generate(
            model,
            inputs.to_device(batch, next(model.parameters()).device),
            max_new_tokens=max_new_tokens,
            num_beams=options.num_beams,
            length_penalty=options.length_penalty,
        )
        answers += [text.strip() for text in builder.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


TASKS = ("qa", "vqa", "multiple-choice", "captioning")
# every metric score() may report; all are higher-is-better
METRICS = ("exact_match", "vqa_accuracy", "mc_rank_accuracy", "mc_generation_accuracy", "bleu4", "cider_d")


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


def evaluate(model, builder: inputs.Collator, samples, task: str, options=GenerationOptions(), progress=True):
    """(metrics, per-sample predictions) of ``model`` on ``samples`` for ``task``.

    ``options``: decoding (GenerationOptions); batches of ``options.batch_size``.
    Raises images.ImageLoadError naming the record for an image that cannot be decoded.
    """
    if task == "captioning":
        samples = one_per_image(samples)
    dataset = data.ManifestDataset(samples)
    records = []
    for start in tqdm(range(0, len(samples), options.batch_size), disable=not progress, desc="evaluate"):
        examples = [dataset[i] for i in range(start, min(start + options.batch_size, len(samples)))]
        answers = answer(model, builder, [e.image for e in examples], [e.instruction for e in examples], options)
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
