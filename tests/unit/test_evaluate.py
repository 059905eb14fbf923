"""``qformer-lora evaluate``: the task metrics of a run or a bare base, on every format's data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qformer_lora import cli, data, forward, inputs, metrics, presets, tasks
from qformer_lora.inference import evaluate, generate
from qformer_lora.training.run_config import TINY_BASE_CHECKPOINT, TrainConfig

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "formats"
# format -> (data path, task, the metrics its results must hold)
DATA = {
    "jsonl": (FIXTURES / "jsonl" / "val.jsonl", "qa", {"exact_match"}),
    "llava": (FIXTURES / "llava" / "llava_v1_5_mix665k.json", "qa", {"exact_match"}),
    "hf": (FIXTURES / "hf", "qa", {"exact_match"}),
    "coco": (FIXTURES / "coco" / "annotations" / "captions_val2014.json", "captioning", {"bleu4", "cider_d"}),
    "vqav2": (FIXTURES / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json", "vqa", {"vqa_accuracy"}),
    "scienceqa": (FIXTURES / "scienceqa" / "problems.json", "multiple-choice", {"mc_rank_accuracy"}),
}


def read_results(out: Path) -> tuple[dict, list[dict]]:
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return document, records


@pytest.mark.filterwarnings("ignore::UserWarning")  # skipped-record counts and truncation, tested elsewhere
@pytest.mark.parametrize("data_format", list(DATA))
def test_a_base_is_evaluated_on_every_format(tmp_path, data_format, capsys):
    path, task, expected = DATA[data_format]
    out = tmp_path / "eval"
    argv = ["evaluate", "--base-checkpoint", str(TINY_BASE_CHECKPOINT), "--manifest", str(path), "--out", str(out)]
    assert cli.main([*argv, "--max-prompt-tokens", "64", "--max-answer-tokens", "16"]) == 0
    document, records = read_results(out)
    assert document["task"] == task and expected | {"exact_match"} <= set(document["metrics"])
    assert document["samples"] == len(records) > 0
    # the file's exact match is the mean of its records' (recomputed from the predictions here)
    by_hand = sum(metrics.exact_match(r["prediction"], r["answer"]) for r in records) / len(records)
    assert document["metrics"]["exact_match"] == pytest.approx(by_hand)
    assert "| exact_match |" in (out / "results.md").read_text() and "written to" in capsys.readouterr().out


def test_captioning_scores_one_caption_per_image():
    samples = tasks.one_per_image(data_samples("coco"))
    assert len({s.image_path for s in samples}) == len(samples) and all(len(s.answers) >= 1 for s in samples)


def data_samples(data_format: str):
    from qformer_lora import formats

    return formats.read(DATA[data_format][0], data_format, split="val")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rank_scoring_takes_the_option_with_the_highest_answer_likelihood():
    """Each option's score is minus its summed token loss as the answer (computed here one option at
    a time with the loss's own sum), and the chosen option is the argmax."""
    model = presets.load_model(TINY_BASE_CHECKPOINT).eval()
    processor = data.build_processor("instructblip", TINY_BASE_CHECKPOINT)
    builder = inputs.Collator.for_model(processor, model.config, {"max_prompt_tokens": 64, "max_answer_tokens": 16})
    sample = data_samples("scienceqa")[0]
    example = data.ManifestDataset([sample])[0]
    (scores,) = tasks.rank_choices(model, builder, [example], [sample])
    for choice, score in zip(sample.choices, scores):
        batch = builder([data.Example(example.image, example.instruction, choice, example.id)])
        with torch.no_grad():
            loss_sum = forward.custom_forward(model, batch, reduction="sum").loss
        assert score == pytest.approx(-float(loss_sum), rel=1e-5)
    assert metrics.choice_by_rank(scores) == max(range(len(scores)), key=scores.__getitem__)


def test_a_run_is_evaluated_with_its_own_budgets(tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(output_dir=str(run), epochs=1, max_prompt_tokens=20, max_answer_tokens=6, progress=False)
    from qformer_lora.training.train import train

    train(config)
    assert cli.main(["evaluate", str(run), "--limit", "8"]) == 0
    document, records = read_results(run / "evaluation")
    assert document["samples"] == 8 and document["task"] == "qa"
    model, processor, _, saved = generate.load_trained(next((run / "checkpoints").iterdir()))
    assert generate.collator(model, processor, saved).max_prompt_tokens == 20  # the run's, not the default 32
    assert cli.main(["evaluate", str(run), "--max-prompt-tokens", "40"]) == 2  # a run keeps its budgets


def test_neither_or_both_sources_are_refused(capsys):
    assert cli.main(["evaluate"]) == 2
    assert cli.main(["evaluate", "run", "--base-checkpoint", str(TINY_BASE_CHECKPOINT)]) == 2
    assert "--base-checkpoint DIR" in capsys.readouterr().err


def test_results_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    evaluate.write(out, {"metrics": {"exact_match": 0.5}, "model": "m", "samples": 1, "data": "d", "task": "qa",
                         "created": "now"}, [{"id": "a"}])  # fmt: skip
    before = (out / "results.json").read_text()
    # a value JSON cannot hold fails the write before anything moves (a NaN no longer does: strict JSON
    # writes it as the string "NaN", qformer_lora.jsonio)
    with pytest.raises(TypeError):
        evaluate.write(out, {"metrics": {"exact_match": object()}}, [{"id": "a"}])
    assert (out / "results.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no staging directory left behind


# --------------------------------------------------------------------------- evaluation in training


def epoch_log(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "epoch"]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    """4 epochs, task metrics every 2, the best epoch by exact match kept though only 1 checkpoint is."""
    from qformer_lora.training.train import train

    run = tmp_path_factory.mktemp("evaluated") / "run"
    config = dict(epochs=4, eval_every=2, best_metric="eval_exact_match", save_every=4, keep_last=1)
    train(TrainConfig(output_dir=str(run), progress=False, **config))
    return run


def test_training_logs_task_metrics_from_zero_shot_on(evaluated_run):
    log = epoch_log(evaluated_run)
    assert [r["epoch"] for r in log if "eval_exact_match" in r] == [0, 2, 4]  # zero-shot, every 2, the last
    # the best epoch: the highest eval_exact_match logged so far, the earlier on a tie
    for i, record in enumerate(log[1:], start=1):
        seen = [(r["eval_exact_match"], -r["epoch"]) for r in log[1 : i + 1] if "eval_exact_match" in r]
        assert record.get("best_epoch") == (-max(seen)[1] if seen else None)


def test_the_best_checkpoint_is_kept_and_scores_as_logged(evaluated_run, capsys):
    log = epoch_log(evaluated_run)
    best = log[-1]["best_epoch"]
    kept = sorted(p.name for p in (evaluated_run / "checkpoints").iterdir())
    assert kept == sorted({f"epoch-{best:04d}", "epoch-0004"}), kept  # keep_last 1, plus the best
    path = evaluated_run / "checkpoints" / f"epoch-{best:04d}"
    assert cli.main(["evaluate", str(path), "--out", str(evaluated_run / "best-eval")]) == 0
    document, _ = read_results(evaluated_run / "best-eval")
    logged = next(r for r in log if r["epoch"] == best)["eval_exact_match"]
    assert document["metrics"]["exact_match"] == pytest.approx(logged)  # in the loop as on the command line


def test_best_metric_must_be_logged():
    from qformer_lora.training.run_config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="best_metric"):
        load_run_config(None, {"best_metric": "eval_exact_match"})  # no --eval-every: never logged
    assert load_run_config(None, {"best_metric": "val_loss"}).best_metric == "val_loss"
