"""The model card (README.md) an export writes: the hub's metadata header, what was trained, how to use it.

The header is the YAML block the Hugging Face hub reads (``base_model``, ``library_name``,
``pipeline_tag``, ``tags`` and, when the run logged validation figures, ``model-index``
results; https://huggingface.co/docs/hub/model-cards). The body says what the adapter was
(rank, alpha, target layers, scope), what it was trained on (manifest names and sizes), the
figures from the run's metrics.jsonl, and a load-and-generate snippet for plain transformers
that the tests run as written here.

Everything comes from the training checkpoint (``trainer_state.json``: the run's config and
epoch), the run directory's ``metrics.jsonl`` next to its ``checkpoints/`` folder, and the
merged model itself; nothing is looked up online.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import __version__, checkpoint, compat
from ..training import run_dir

CARD_FILE = "README.md"
DEFAULT_QUESTION = "What is in the image?"  # the snippet's question when the validation data cannot be read
MAX_NEW_TOKENS = 8  # as `qformer-lora generate` (its --max-new-tokens default)


@dataclass(frozen=True)
class CardFacts:
    """What the card says; ``of_run`` gathers it from a checkpoint, its run and the merged model."""

    name: str  # the export directory's name: the snippet's model_id and the card's title
    base_model: str  # hub id ("org/name") when the base came from the hub's cache, else a name
    base_origin: str  # one line: where the base weights came from
    model_class: str  # e.g. InstructBlipForConditionalGeneration
    model_type: str  # config.model_type: instructblip | blip-2
    language_model: str  # text_config.model_type: t5 | opt | llama ...
    decoder_only: bool
    lora: dict  # r, alpha, dropout, targets, scope (the run config's)
    training: dict  # epochs, batch_size, grad_accum, lr, precision, seed
    train_data: tuple[str, int | None]  # (manifest name, samples; None when it is gone)
    val_data: tuple[str, int | None]
    before: dict | None  # the epoch-0 record of metrics.jsonl (validation before training)
    after: dict | None  # the record of the exported checkpoint's epoch
    question: str  # the snippet's example question

    @classmethod
    def of_run(cls, checkpoint_path: Path, config: dict, merged, family: str, name: str) -> CardFacts:
        state = json.loads((checkpoint_path / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
        before, after = _epoch_records(checkpoint_path.parent.parent / run_dir.LOG_FILE, state["epoch"])
        return cls(
            name=name,
            base_model=base_model_id(config),
            base_origin=_base_origin(config),
            model_class=type(merged).__name__,
            model_type=merged.config.model_type,
            language_model=merged.config.text_config.model_type,
            decoder_only=bool(merged.config.use_decoder_only_language_model),
            lora={k: config[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "targets", "scope")},
            training={"epochs": state["epoch"]}
            | {k: config[k] for k in ("batch_size", "grad_accum", "lr", "precision", "seed")},
            train_data=_manifest_summary(config["train_manifest"]),
            val_data=_manifest_summary(config["val_manifest"]),
            before=before,
            after=after or state.get("metrics") or None,  # a checkpoint copied without its run: its own record
            question=_first_instruction(config["val_manifest"]) or DEFAULT_QUESTION,
        )


def base_model_id(config: dict) -> str:
    """The base model as the card's ``base_model`` names it.

    A base loaded from the hub's cache (``.../models--ORG--NAME/snapshots/<hash>``) is ``ORG/NAME``;
    any other local checkpoint is its directory name; a preset base is the preset's name.
    """
    base = config.get("base_checkpoint")
    if not base:
        return config["preset"]
    for part in Path(base).parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return Path(base).name


def _base_origin(config: dict) -> str:
    base = config.get("base_checkpoint")
    if not base:
        return f"preset {config['preset']}, randomly initialised with seed {config['seed']}"
    return "a snapshot in the hub's cache" if "models--" in base else "a local checkpoint"


def _epoch_records(log: Path, epoch: int) -> tuple[dict | None, dict | None]:
    """(epoch 0, epoch ``epoch``) records of a metrics.jsonl; Nones when absent. A torn line is skipped."""
    if not log.is_file():
        return None, None
    found = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # an interrupted run's last line; the records before it stand
        if isinstance(record, dict) and record.get("type") == "epoch":
            found[record.get("epoch")] = record
    return found.get(0), found.get(epoch)


def _manifest_summary(path: str) -> tuple[str, int | None]:
    """("<folder>/<file>", number of samples) of a JSONL manifest; None samples when it is unreadable."""
    manifest = Path(path)
    label = f"{manifest.parent.name}/{manifest.name}"
    try:
        return label, sum(1 for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return label, None


def _first_instruction(path: str) -> str | None:
    try:
        first = next(line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
        instruction = json.loads(first).get("instruction")
    except (OSError, UnicodeDecodeError, StopIteration, json.JSONDecodeError, AttributeError):
        return None
    return instruction if isinstance(instruction, str) and instruction.strip() else None


def header(facts: CardFacts) -> dict:
    """The card's metadata block as a dict (YAML-dumped by ``card_text``)."""
    meta = {
        "base_model": facts.base_model,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["qformer-lora", "lora", "peft", "merged", facts.model_type, facts.language_model],
    }
    if facts.after and "val_accuracy" in facts.after:
        val_name = facts.val_data[0]
        meta["model-index"] = [
            {
                "name": facts.name,
                "results": [
                    {
                        "task": {"type": "visual-question-answering", "name": "Visual Question Answering"},
                        "dataset": {"name": val_name, "type": val_name},
                        "metrics": [
                            {"type": "accuracy", "value": facts.after["val_accuracy"], "name": "answer accuracy"},
                            {"type": "loss", "value": facts.after["val_loss"], "name": "validation loss"},
                        ],
                    }
                ],
            }
        ]
    return meta


def snippet(facts: CardFacts) -> str:
    """Python that loads the export with plain transformers and answers one question (run by the tests)."""
    decode = ["answer = processor.batch_decode(output, skip_special_tokens=True)"]
    if facts.decoder_only:  # newer releases return the prompt (image tokens and text) before the answer
        decode[:0] = [
            'prompt = inputs["input_ids"]',
            "if torch.equal(output[:, : prompt.shape[1]], prompt):  # some releases return the prompt first",
            "    output = output[:, prompt.shape[1] :]",
        ]
    return "\n".join(
        [
            "import torch",
            "from PIL import Image",
            f"from transformers import AutoProcessor, {facts.model_class}",
            "",
            f'model_id = "{facts.name}"  # this directory, or the hub repository it was uploaded to',
            "processor = AutoProcessor.from_pretrained(model_id)",
            f"model = {facts.model_class}.from_pretrained(model_id).eval()",
            "",
            'image = Image.open("image.png").convert("RGB")',
            f'inputs = processor(images=image, text={json.dumps(facts.question)}, return_tensors="pt")',
            "with torch.no_grad():",
            f"    output = model.generate(**inputs, max_new_tokens={MAX_NEW_TOKENS}, do_sample=False, num_beams=1)",
            *decode,
            "print(answer[0].strip())",
        ]
    )


def _figures_table(facts: CardFacts) -> list[str]:
    if not facts.after:
        return ["The run logged no validation figures for this checkpoint."]
    rows = [("before training (epoch 0)", facts.before), (f"after epoch {facts.training['epochs']}", facts.after)]
    lines = ["| | validation loss | answer accuracy |", "| --- | --- | --- |"]
    lines += [f"| {label} | {r['val_loss']:.4f} | {r['val_accuracy']:.3f} |" for label, r in rows if r]
    lines.append("")
    lines.append(
        "Loss: mean cross-entropy over the answer tokens. Accuracy: share of samples whose every answer token "
        "is the model's first choice given the previous ones (teacher-forced)."
        + (
            f" Always answering the commonest answer scores {facts.after['majority_baseline']:.3f}."
            if "majority_baseline" in facts.after
            else ""
        )
    )
    return lines


def _batch_note(facts: CardFacts) -> str:
    note = "Batches: pass lists of images and questions with `padding=True`."
    if not facts.decoder_only:
        return note
    note += " The tokenizer pads on the left, so every prompt ends where its answer starts."
    if facts.model_type == "instructblip":
        note += (
            " The InstructBLIP processor pads the Q-Former's copy of the question on the same side (transformers"
            " 5.24), which moves its position ids; for the answers one question at a time gives, replace"
            ' `inputs["qformer_input_ids"]` and `inputs["qformer_attention_mask"]` by'
            ' `processor.qformer_tokenizer(questions, padding=True, padding_side="right", return_tensors="pt")`.'
        )
    return note


def _size(data: tuple[str, int | None]) -> str:
    return f"`{data[0]}` ({data[1]} samples)" if data[1] is not None else f"`{data[0]}` (size unknown: not found)"


def card_text(facts: CardFacts) -> str:
    """The whole README.md: metadata header, description, training, figures, usage."""
    lora, training = facts.lora, facts.training
    versions = compat.versions()
    body = [
        f"# {facts.name}",
        "",
        f"{facts.model_class} ({facts.language_model} language model) with a LoRA adapter on its Q-Former, "
        f"merged into the weights (PEFT `merge_and_unload`) by qformer-lora {__version__}. "
        f"Base: `{facts.base_model}` ({facts.base_origin}).",
        "",
        "## Adapter",
        "",
        f"- rank r = {lora['lora_r']}, alpha = {lora['lora_alpha']}, dropout = {lora['lora_dropout']}",
        f"- target layers: {', '.join(lora['targets'])} (scope: {lora['scope']})",
        "",
        "## Training",
        "",
        f"- training data: {_size(facts.train_data)}; validation data: {_size(facts.val_data)}",
        f"- {training['epochs']} epochs, batch {training['batch_size']} x {training['grad_accum']} accumulation, "
        f"peak learning rate {training['lr']}, precision {training['precision']}, seed {training['seed']}",
        "",
        "## Evaluation",
        "",
        *_figures_table(facts),
        "",
        "## Use",
        "",
        "```python",
        snippet(facts),
        "```",
        "",
        _batch_note(facts),
        "",
        f"Written with transformers {versions['transformers']}, peft {versions['peft']}, torch {versions['torch']}.",
        "",
    ]
    return "---\n" + yaml.safe_dump(header(facts), sort_keys=False) + "---\n\n" + "\n".join(body)


def python_snippet(card: str) -> str:
    """The first ```python block of a card (the load-and-generate snippet); ValueError when there is none."""
    start = card.find("```python\n")
    end = card.find("\n```", start + 1)
    if start < 0 or end < 0:
        raise ValueError("the model card has no ```python block")
    return card[start + len("```python\n") : end]
