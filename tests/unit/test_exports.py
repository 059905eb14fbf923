"""What we write runs in plain transformers and PEFT (issue 23).

A plain user loads an export with ``AutoProcessor`` and the model's Auto class, calls
``processor(images=..., text=..., return_tensors="pt")`` and the model's own ``generate``; or
loads our adapter with ``PeftModel.from_pretrained`` on the base. Both must answer as
``qformer-lora generate`` (generate.answer / forward.generate) does. On every tiny preset
(BLIP-2 and InstructBLIP, T5 and decoder-only) a base is built in-process and saved with its
completed processor, an adapter with deterministic non-zero LoRA weights is written as a
training checkpoint, exported, and answered four ways on the same shapes validation samples.

Compared: the generated token ids (exactly) and the first answer token's logits (within
ATOL). Decoded strings alone would be weak here: the random tiny language models mostly
produce ids beyond the 190-word fixture tokenizer, which decode to "".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoProcessor

from qformer_lora import checkpoint, cli, compat, data, forward, inputs, lora, presets, tasks
from qformer_lora.inference import export, generate, model_card
from qformer_lora.training import run_config

from ..conftest import TINY_PRESETS

TINY_BASE = run_config.TINY_BASE_CHECKPOINT
SAMPLES = 4  # shapes val 0-3: prompts of 7, 7, 7 and 8 LM tokens, so a batch pads rows 0-2 by one
MAX_NEW_TOKENS = 8
# Logits are compared with torch.testing.assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5): the
# same fp32 arithmetic reached by two routes. Ours concatenates the query outputs with the text
# embeddings, the library scatters them into placeholder positions (the same inputs), batched rows
# reduce in another order, and a merged weight W + s * B @ A rounds differently from W x + s * B (A x).
# A lost adapter moves the logits by more than 1e-2 (test_the_adapter_moves_every_preset).
# Run metrics written into the fake run's metrics.jsonl: the card must show these very figures.
EPOCH_RECORDS = (
    {"type": "epoch", "epoch": 0, "step": 0, "val_loss": 1.25, "val_accuracy": 0.375, "majority_baseline": 0.25},
    {"type": "epoch", "epoch": 1, "step": 3, "train_loss": 0.9, "val_loss": 0.5, "val_accuracy": 0.625,
     "majority_baseline": 0.25},
)  # fmt: skip


def val_samples(n: int = SAMPLES) -> list[data.Example]:
    return [data.ShapesDataset("val")[i] for i in range(n)]


def set_lora_weights(model, seed: int) -> None:
    """Every LoRA A and B drawn from N(0, 0.5^2) under ``seed``: non-zero, so the adapter changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def save_base(preset: str, out: Path) -> Path:
    """A tiny base saved as a local checkpoint with its completed processor; the shipped base for T5 InstructBLIP
    (a trained language model: its answers are words)."""
    if preset == "tiny-instructblip-flan-t5":
        return TINY_BASE
    model = presets.build_model(preset, seed=0)
    family = presets.load_preset(preset).family
    processor = data.build_processor(family, image_size=model.config.vision_config.image_size)
    export.complete_processor(processor, model.config)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def write_run(preset: str, base: Path, run: Path) -> Path:
    """A one-epoch training checkpoint of ours (adapter r=2 on the Q-Former) plus the run's metrics.jsonl."""
    config = run_config.TrainConfig(preset=preset, base_checkpoint=str(base), output_dir=str(run), lora_r=2)
    model = lora.apply_lora(presets.load_model(base), lora.LoraSpec(r=2))
    set_lora_weights(model, seed=1)
    optimizer = torch.optim.AdamW(lora.adapter_parameters(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EPOCH_RECORDS))
    return checkpoint.save(
        run, 1, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, global_step=3,
        config=dataclasses.asdict(config), metrics=EPOCH_RECORDS[1],
    )  # fmt: skip


def our_builder(model, processor):
    """`qformer-lora generate`'s input builder for a model without a run: TrainConfig's budgets."""
    return generate.collator(model, processor, dataclasses.asdict(run_config.TrainConfig()))


def our_batch(model, processor, images, questions) -> dict:
    examples = [data.Example(image, question, "", str(i)) for i, (image, question) in enumerate(zip(images, questions))]
    return our_builder(model, processor).prompts(examples)


def our_answers(model, processor, images, questions) -> list[str]:
    return tasks.answer(model, our_builder(model, processor), images, questions)


def native_generate(model, inputs: dict) -> tuple[list[list[int]], torch.Tensor]:
    """(answer token ids per row, first answer token's logits) from the library's own generate."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    sequences = out.sequences
    if model.config.use_decoder_only_language_model:  # the library returns prompt + answer
        sequences = sequences[:, inputs["input_ids"].shape[1] :]
    return sequences.tolist(), out.logits[0]


def our_generate(model, processor, family: str, images, questions) -> tuple[list[list[int]], torch.Tensor]:
    """The same from `qformer-lora generate`'s inputs (inputs.Collator.prompts) and forward.generate."""
    batch = our_batch(model, processor, images, questions)
    ids = forward.generate(model, batch, max_new_tokens=MAX_NEW_TOKENS).tolist()
    return ids, first_token_logits(model, batch)


def first_token_logits(model, batch: dict) -> torch.Tensor:
    """The first answer token's logits as forward.generate computes them: the language model's own generate
    on our inputs_embeds, one step (its position ids follow the attention mask, as in the library's)."""
    inputs_embeds, attention_mask = forward.generation_inputs(model, batch)
    with torch.no_grad():
        out = compat.unwrap(model).language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=1, do_sample=False,
            num_beams=1, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.logits[0]


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def native_inputs(processor, images, questions, *, our_layout: bool = False) -> dict:
    """``processor(images=..., text=..., padding=True)`` as a plain user calls it; ``our_layout``: the padding
    `qformer-lora generate` uses (inputs.Collator.prompts: the LM prompt on the export's side, right for T5 and
    left for decoder-only LMs as complete_processor sets it; the Q-Former's instruction on the right)."""
    inputs = dict(processor(images=images, text=questions, return_tensors="pt", padding=True))
    if our_layout and "qformer_input_ids" in inputs:
        # transformers 5.24's InstructBLIP processor pads both tokenizers on the LM tokenizer's side: the recipe
        # the model card gives for decoder-only InstructBLIP exports
        qformer = processor.qformer_tokenizer(questions, padding=True, padding_side="right", return_tensors="pt")
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = qformer["input_ids"], qformer["attention_mask"]
    return inputs


@dataclasses.dataclass
class RoundTrip:
    """One preset's base, checkpoint and export; the models loaded once per module (tests only read them)."""

    preset: str
    family: str
    base: Path
    checkpoint: Path
    export: Path

    @functools.cached_property
    def plain(self):
        """(processor, merged model, PeftModel on the base) loaded the plain way, nothing of ours involved."""
        auto = compat.image_text_auto_class()
        processor = AutoProcessor.from_pretrained(str(self.export), local_files_only=True)
        merged = auto.from_pretrained(str(self.export), local_files_only=True).eval()
        base = auto.from_pretrained(str(self.base), local_files_only=True)
        adapter = PeftModel.from_pretrained(base, str(self.checkpoint / checkpoint.ADAPTER_DIR)).eval()
        return processor, merged, adapter

    @functools.cached_property
    def ours(self):
        """generate.load_trained's (model, processor, family), as `qformer-lora generate CHECKPOINT` loads them."""
        model, processor, family, _ = generate.load_trained(self.checkpoint)
        return model, processor, family


# The default run covers both families and both language model kinds with the shipped base (InstructBLIP,
# T5) and BLIP-2 OPT; the other two presets add ~10 s and run with -m long.
ROUND_TRIP_PRESETS = [
    pytest.param(p, marks=[] if p in ("tiny-instructblip-flan-t5", "tiny-blip2-opt") else [pytest.mark.long])
    for p in TINY_PRESETS
]


@pytest.fixture(scope="module", params=ROUND_TRIP_PRESETS)
def round_trip(request, tmp_path_factory) -> RoundTrip:
    preset = request.param
    tmp = tmp_path_factory.mktemp(preset)
    base = save_base(preset, tmp / "base")
    path = write_run(preset, base, tmp / "run")
    out = export.export_merged(path, tmp / "merged")
    return RoundTrip(preset, presets.load_preset(preset).family, base, path, out)


def test_one_sample_at_a_time_plain_transformers_and_peft_answer_as_we_do(round_trip):
    """No padding: the native processor's input is ours by construction. The exported tokenizers' post-processors
    add training's special tokens (T5: prompt + </s>; decoder-only LMs: none; Q-Former: [CLS] prompt [SEP]),
    and the processor's num_query_tokens image tokens become the query outputs ours prepends."""
    processor, merged, adapter = round_trip.plain
    model, our_processor, family = round_trip.ours
    for sample in val_samples():
        ids, logits = our_generate(model, our_processor, family, [sample.image], [sample.instruction])
        inputs = native_inputs(processor, [sample.image], [sample.instruction])
        assert inputs["input_ids"][0, : merged.config.num_query_tokens].eq(merged.config.image_token_index).all()
        for plain in (merged, adapter):
            native_ids, native_logits = native_generate(plain, inputs)
            assert native_ids == ids, (round_trip.preset, sample.id, type(plain).__name__)
            torch.testing.assert_close(native_logits, logits)
        assert our_answers(model, our_processor, [sample.image], [sample.instruction]) == [
            processor.batch_decode(torch.tensor(ids), skip_special_tokens=True)[0].strip()
        ]


def test_a_batch_answers_as_ours_given_our_padding(round_trip):
    """A batch pads rows 0-2 by one token. In the layout `qformer-lora generate` builds
    (inputs.Collator.prompts: the T5 prompt right-padded as in training, a decoder-only prompt
    left-padded, the Q-Former's instruction right-padded) plain transformers and PEFT answer as
    we do, and the export's own default layout is that layout: T5 tokenizers pad right, and
    complete_processor makes decoder-only ones pad left and add no special tokens (training's
    prompt convention). One exception by construction: transformers 5.24's InstructBLIP processor
    pads the Q-Former's instruction on the LM tokenizer's side, which shifts the BERT position
    ids of padded rows of InstructBLIP-Vicuna; only its unpadded row is compared with the
    one-at-a-time answers there (the model card gives the right-padding recipe).
    """
    processor, merged, adapter = round_trip.plain
    model, our_processor, family = round_trip.ours
    samples = val_samples()
    images, questions = [s.image for s in samples], [s.instruction for s in samples]
    ours, our_logits = our_generate(model, our_processor, family, images, questions)
    singles = [native_generate(merged, native_inputs(processor, [i], [q])) for i, q in zip(images, questions)]
    shifted_qformer = family == "instructblip" and merged.config.use_decoder_only_language_model
    comparable = [3] if shifted_qformer else list(range(SAMPLES))  # row 3 is the longest: never padded
    eos = merged.config.text_config.eos_token_id
    for plain in (merged, adapter):
        native_ids, native_logits = native_generate(plain, native_inputs(processor, images, questions, our_layout=True))
        assert native_ids == ours, (round_trip.preset, type(plain).__name__)
        torch.testing.assert_close(native_logits, our_logits)
        default_ids, default_logits = native_generate(plain, native_inputs(processor, images, questions))
        for row in comparable:  # a batch row that ended earlier than the others goes on as padding
            assert until_eos(default_ids[row], eos) == singles[row][0][0], (round_trip.preset, row, type(plain))
            torch.testing.assert_close(default_logits[row], singles[row][1][0])


def test_the_adapter_moves_every_preset(round_trip):
    # without this, a round trip that dropped the adapter everywhere would still compare equal
    model, processor, family = round_trip.ours
    samples = val_samples()
    batch = our_batch(model, processor, [s.image for s in samples], [s.instruction for s in samples])
    base = presets.load_model(round_trip.base)
    gap = (first_token_logits(model, batch) - first_token_logits(base, batch)).abs().max()
    assert gap > 1e-2, f"{round_trip.preset}: the adapter moves the first-token logits by {gap:.1e} only"


def test_the_model_card_describes_the_run_and_its_snippet_runs(round_trip):
    card = (round_trip.export / model_card.CARD_FILE).read_text(encoding="utf-8")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    state = json.loads((round_trip.checkpoint / checkpoint.STATE_FILE).read_text())
    assert meta["base_model"] == Path(round_trip.base).name and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text" and {"lora", "qformer-lora"} <= set(meta["tags"])
    [result] = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.625, "loss": 0.5}  # EPOCH_RECORDS[1]
    assert "rank r = 2, alpha = 4" in card  # lora_r 2, alpha 2r
    assert "target layers: query, key, value, dense (scope: qformer)" in card
    train_size = len(data.read_manifest(state["config"]["train_manifest"]))
    assert f"`shapes/train.jsonl` ({train_size} samples)" in card
    assert "| before training (epoch 0) | 1.2500 | 0.375 |" in card and "| after epoch 1 | 0.5000 | 0.625 |" in card

    sample = val_samples(1)[0]  # the snippet asks the first validation question
    code = model_card.python_snippet(card)
    assert f'model_id = "{round_trip.export.name}"' in code and json.dumps(sample.instruction) in code
    code = code.replace(f'"{round_trip.export.name}"', repr(str(round_trip.export)))
    code = code.replace('"image.png"', repr(str(data.SHAPES_DIR / "images" / "val_000.png")))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md snippet", "exec"), {})
    model, processor, family = round_trip.ours
    assert printed.getvalue() == our_answers(model, processor, [sample.image], [sample.instruction])[0] + "\n"


# ----------------------------------------------------------------------------- the shipped base, the processor


def test_the_shipped_base_loads_and_answers_through_auto_processor_as_is():
    """The issue's step 4 on the shipped base: no hand fixes. 4 image tokens (num_query_tokens) of id 4
    (image_token_index) lead the prompt, images come out 30 x 30 (vision_config.image_size)."""
    processor = AutoProcessor.from_pretrained(str(TINY_BASE), local_files_only=True)
    sample = val_samples(1)[0]
    inputs = processor(images=sample.image, text=sample.instruction, return_tensors="pt")
    assert inputs["input_ids"][0, :5].tolist() == [4, 4, 4, 4, processor.tokenizer(sample.instruction)["input_ids"][0]]
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 30, 30)
    model = compat.image_text_auto_class().from_pretrained(str(TINY_BASE), local_files_only=True).eval()
    ours, our_processor, family = generate.load_merged(TINY_BASE)
    assert native_generate(model, dict(inputs))[0] == our_generate(ours, our_processor, family, [sample.image],
                                                                   [sample.instruction])[0]  # fmt: skip


def test_the_shipped_base_tokenizers_are_the_training_tokenizers():
    # completing the processor added nothing to the vocabulary: data.build_processor and the Collator see
    # the same ids whether they read the shipped base or the fixture tokenizers
    shipped, fixture = (
        data.build_processor("instructblip", TINY_BASE),
        data.build_processor("instructblip", image_size=30),
    )
    for a, b in ((shipped.tokenizer, fixture.tokenizer), (shipped.qformer_tokenizer, fixture.qformer_tokenizer)):
        assert a.get_vocab() == b.get_vocab()
    batch = val_samples()
    one, other = (inputs.Collator(p, "instructblip", decoder_only=False)(batch) for p in (shipped, fixture))
    assert all(torch.equal(one[k], other[k]) for k in one if torch.is_tensor(one[k]))


def test_complete_processor_fills_what_plain_transformers_needs_and_refuses_misfits():
    model = presets.build_model("tiny-blip2-opt", device="meta")
    processor = data.build_processor("blip2", image_size=30)
    assert processor.num_query_tokens is None  # built from its parts: the null
    export.complete_processor(processor, model.config)
    assert processor.num_query_tokens == 4 and processor.tokenizer.padding_side == "left"  # decoder-only
    legacy = model.config.__class__.from_dict(model.config.to_dict() | {"image_token_index": None})
    export.complete_processor(processor, legacy)  # saved before 4.45: the tokenizer's <image> id, as on the hub
    assert legacy.image_token_index == 4
    wrong_id = model.config.__class__.from_dict(model.config.to_dict() | {"image_token_index": 7})
    with pytest.raises(export.ExportError, match="'image_token_index' is 7"):
        export.complete_processor(processor, wrong_id, where="base X")
    small = data.build_processor("blip2", image_size=16)
    with pytest.raises(export.ExportError, match=r"resizes to 16 x 16 .* 'vision_config.image_size' is 30"):
        export.complete_processor(small, model.config)


def assert_layout_older_releases_read(directory: Path, processor_class: str) -> None:
    """compat.make_readable_by_every_release: 4.33.3, 4.45.2 and 4.57.6 loaded such directories (compat.py
    says what was checked); only 5.24 is installed here, so the layout itself is checked: the image
    processor in preprocessor_config.json, processor_config.json holding num_query_tokens alone, the
    tokenizer class every release knows, and text_config.architectures (InstructBLIP's generate reads it
    on 4.33 and 4.45)."""
    processor_config = json.loads((directory / "processor_config.json").read_text())
    assert processor_config == {"num_query_tokens": 4, "processor_class": processor_class}
    image = json.loads((directory / "preprocessor_config.json").read_text())
    assert image["size"] == {"height": 30, "width": 30} and image["image_processor_type"] == "BlipImageProcessor"
    classes = {json.loads(f.read_text())["tokenizer_class"] for f in directory.rglob("tokenizer_config.json")}
    assert classes == {"PreTrainedTokenizerFast"}
    config = json.loads((directory / "config.json").read_text())
    lm = {"t5": "T5ForConditionalGeneration", "llama": "LlamaForCausalLM", "opt": "OPTForCausalLM"}
    assert config["text_config"]["architectures"] == [lm[config["text_config"]["model_type"]]]


def write_files(directory: Path, files: dict[str, dict]) -> None:
    """JSON files as transformers 5 might leave them: one line, keys in insertion order."""
    for name, value in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def test_make_readable_by_every_release_rewrites_exactly_the_5x_layout(tmp_path):
    """compat.make_readable_by_every_release on a hand-built export: two tokenizer_config.json files in
    subfolders name the 5.x-only "TokenizersBackend" and become "PreTrainedTokenizerFast"; a third, at the
    top, names "BertTokenizer" and is left byte for byte; processor_config.json's nested image_processor
    moves to preprocessor_config.json. Rewritten files are compat._write_json's: indent 2, sorted keys,
    non-ASCII escaped, a final newline. Changed files: the tokenizer files in sorted path order, then the
    two processor files. A second call finds the layout done and changes nothing."""
    untouched = json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    write_files(
        tmp_path,
        {
            "tokenizer/tokenizer_config.json": {"tokenizer_class": "TokenizersBackend", "model_max_length": 512},
            "qformer_tokenizer/tokenizer_config.json": {"tokenizer_class": "TokenizersBackend", "pad": "\u2581é"},
            "processor_config.json": {
                "processor_class": "InstructBlipProcessor",
                "image_processor": {"size": {"width": 30, "height": 30}, "image_processor_type": "BlipImageProcessor"},
                "num_query_tokens": 4,
            },
        },
    )
    (tmp_path / "tokenizer_config.json").write_text(untouched, encoding="utf-8")
    changed = compat.make_readable_by_every_release(tmp_path)
    assert changed == [
        str(Path("qformer_tokenizer", "tokenizer_config.json")),
        str(Path("tokenizer", "tokenizer_config.json")),
        "preprocessor_config.json",
        "processor_config.json",
    ], f"changed files reported: {changed}"
    expected = {
        "qformer_tokenizer/tokenizer_config.json": '{\n  "pad": "\\u2581\\u00e9",\n  "tokenizer_class": '
        '"PreTrainedTokenizerFast"\n}\n',
        "tokenizer/tokenizer_config.json": '{\n  "model_max_length": 512,\n  "tokenizer_class": '
        '"PreTrainedTokenizerFast"\n}\n',
        "tokenizer_config.json": untouched,
        "preprocessor_config.json": '{\n  "image_processor_type": "BlipImageProcessor",\n  "size": {\n'
        '    "height": 30,\n    "width": 30\n  }\n}\n',
        "processor_config.json": '{\n  "num_query_tokens": 4,\n  "processor_class": "InstructBlipProcessor"\n}\n',
    }
    files = {str(p.relative_to(tmp_path).as_posix()): p for p in tmp_path.rglob("*") if p.is_file()}
    assert sorted(files) == sorted(expected), f"files after the rewrite (a temporary file left?): {sorted(files)}"
    for name, text in expected.items():
        assert files[name].read_text(encoding="utf-8") == text, f"{name} reads {files[name].read_text()!r}"
    assert compat.make_readable_by_every_release(tmp_path) == [], "a second call must find nothing to change"
    assert {name: files[name].read_text(encoding="utf-8") for name in expected} == expected


def test_make_readable_by_every_release_without_a_processor_file(tmp_path):
    """A directory holding a tokenizer alone (no processor_config.json) is not a processor to split: only
    the tokenizer file changes, and no processor file appears."""
    write_files(tmp_path, {"tokenizer_config.json": {"tokenizer_class": "TokenizersBackend"}})
    assert compat.make_readable_by_every_release(tmp_path) == ["tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer_config.json"]


def test_name_text_architecture_fills_a_missing_name_and_keeps_a_given_one():
    """A config built from a preset has text_config.architectures None: it gets [the LM's class name]
    (OPTForCausalLM for tiny-blip2-opt); a name already there is kept; a config object without the
    attribute at all gets it too (here the LM is an nn.Identity, so ["Identity"])."""
    model = presets.build_model("tiny-blip2-opt")
    assert model.config.text_config.architectures is None
    compat.name_text_architecture(model)
    assert model.config.text_config.architectures == ["OPTForCausalLM"], model.config.text_config.architectures
    model.config.text_config.architectures = ["MyCausalLM"]
    compat.name_text_architecture(model)
    assert model.config.text_config.architectures == ["MyCausalLM"], "a recorded architecture must be kept"
    bare = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace()), language_model=torch.nn.Identity())
    compat.name_text_architecture(bare)
    assert bare.config.text_config.architectures == ["Identity"]


def test_exports_and_the_shipped_base_use_the_layout_older_releases_read(round_trip):
    processor_class = {"instructblip": "InstructBlipProcessor", "blip2": "Blip2Processor"}[round_trip.family]
    assert_layout_older_releases_read(round_trip.export, processor_class)
    assert_layout_older_releases_read(TINY_BASE, "InstructBlipProcessor")


def test_base_model_id_reads_the_hub_cache_layout():
    cached = "/home/u/.cache/huggingface/hub/models--Salesforce--instructblip-flan-t5-xl/snapshots/abc123"
    assert model_card.base_model_id({"base_checkpoint": cached}) == "Salesforce/instructblip-flan-t5-xl"
    assert model_card.base_model_id({"base_checkpoint": "/data/my-base"}) == "my-base"
    assert model_card.base_model_id({"base_checkpoint": None, "preset": "tiny-blip2-opt"}) == "tiny-blip2-opt"


# ----------------------------------------------------------------------------- the other way: PEFT adapters


@pytest.fixture(scope="module")
def plain_peft_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter trained elsewhere with plain PEFT on the shipped base: bare Q-Former target names
    (query, value), r=4, alpha=8, random non-zero B (init_lora_weights=False) under a fixed seed."""
    torch.manual_seed(3)
    base = compat.image_text_auto_class().from_pretrained(str(TINY_BASE), local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            init_lora_weights=False))  # fmt: skip
    out = tmp_path_factory.mktemp("plain-peft") / "adapter"
    model.save_pretrained(str(out))
    return out


def test_generate_answers_with_a_plain_peft_adapter_and_reports_its_scope(plain_peft_adapter, capsys):
    sample = val_samples(1)[0]
    image = str(data.SHAPES_DIR / "images" / "val_000.png")
    args = ["generate", "--adapter", str(plain_peft_adapter), "--image", image, "--question", sample.instruction]
    assert cli.main(args) == 0  # the base: what adapter_config.json records (the shipped base's path)
    out, err = capsys.readouterr()
    base = compat.image_text_auto_class().from_pretrained(str(TINY_BASE), local_files_only=True)
    plain = PeftModel.from_pretrained(base, str(plain_peft_adapter)).eval()
    processor = AutoProcessor.from_pretrained(str(TINY_BASE), local_files_only=True)
    ids, _ = native_generate(plain, dict(processor(images=sample.image, text=sample.instruction, return_tensors="pt")))
    answer = processor.batch_decode(torch.tensor(ids), skip_special_tokens=True)[0].strip()
    assert out == f"{sample.instruction} -> {answer}\n"
    # query and value in both Q-Former layers' self-attention and in layer 0's cross-attention (the tiny
    # base cross-attends every 2nd layer): 2 x 2 + 2 = 6 layers, an A and a B each: 12 LoRA tensors
    assert f"base checkpoint {TINY_BASE}" in err and "LoRA r=4 alpha=8 targets=query,value scope=qformer" in err
    assert "LoRA tensors:         12" in err
    assert [line.split()[-1] for line in err.splitlines() if line.startswith(("qformer ", "language_model "))] == [
        "12",
        "0",
    ]
    assert cli.main([*args, "--base-checkpoint", str(TINY_BASE)]) == 0  # named explicitly: the same
    assert capsys.readouterr().out == out


def test_generate_answers_with_a_merged_model_as_it_is(round_trip, capsys):
    sample = val_samples(1)[0]
    image = str(data.SHAPES_DIR / "images" / "val_000.png")
    assert cli.main(["generate", "--base-checkpoint", str(round_trip.export), "--image", image,
                     "--question", sample.instruction]) == 0  # fmt: skip
    model, processor, family = round_trip.ours
    expected = our_answers(model, processor, [sample.image], [sample.instruction])[0]
    assert capsys.readouterr().out == f"{sample.instruction} -> {expected}\n"


def test_generate_refuses_an_adapter_outside_every_scope_and_says_what_is_missing(tmp_path, capsys):
    base = compat.image_text_auto_class().from_pretrained(str(TINY_BASE), local_files_only=True)
    get_peft_model(base, LoraConfig(r=2, target_modules=["qkv"])).save_pretrained(str(tmp_path / "vision"))
    image = str(data.SHAPES_DIR / "images" / "val_000.png")
    question = ["--image", image, "--question", "what shape is it?"]
    assert cli.main(["generate", "--adapter", str(tmp_path / "vision"), *question]) == 2
    assert "LoRA layers or trained modules in vision_model, outside every scope" in capsys.readouterr().err
    assert cli.main(["generate", "--adapter", str(tmp_path), *question]) == 2
    assert f"{tmp_path}: not a PEFT adapter directory (adapter_config.json missing)" in capsys.readouterr().err
    config = json.loads((tmp_path / "vision" / "adapter_config.json").read_text())
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/x"}))
    assert cli.main(["generate", "--adapter", str(tmp_path / "hub"), *question]) == 2
    assert "field 'base_model_name_or_path' is 'org/x', not a local checkpoint directory" in capsys.readouterr().err
    assert cli.main(["generate", "run", "--adapter", str(tmp_path / "vision"), *question]) == 2
    assert "--adapter and --base-checkpoint are for models trained elsewhere" in capsys.readouterr().err
    assert cli.main(["generate", *question]) == 2
    assert "name a training checkpoint or run, --adapter DIR, or --base-checkpoint DIR" in capsys.readouterr().err
    assert cli.main(["generate", "--adapter", str(tmp_path / "vision")]) == 2  # no run: no default data
    assert "no run to take validation data from" in capsys.readouterr().err


def test_evaluate_scores_a_plain_peft_adapter_as_generate_answers(plain_peft_adapter, tmp_path, capsys):
    """evaluate --adapter: the adapter's predictions on the shapes validation data are generate --adapter's."""
    manifest = str(data.SHAPES_DIR / "val.jsonl")
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--adapter", str(plain_peft_adapter), "--manifest", manifest, "--limit", "3",
                     "--out", str(out)]) == 0  # fmt: skip
    predictions = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(plain_peft_adapter), "--manifest", manifest, "--limit", "3"]) == 0
    answers = [line.split(" -> ")[1].split("   (expected")[0] for line in capsys.readouterr().out.splitlines()]
    assert predictions == answers and len(answers) == 3
