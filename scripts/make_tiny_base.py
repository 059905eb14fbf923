"""Make the tiny "pretrained" base checkpoint the embedded default run starts from.

Why: a randomly initialised, frozen language model cannot be steered by a Q-Former
adapter (measured: loss stalls, accuracy 0), so a LoRA run on it shows nothing. Real
InstructBLIP/BLIP-2 fine-tuning starts from a pretrained vision encoder and language
model, and BLIP-2's second stage trains the Q-Former between them. This script builds
that situation in miniature, in a few minutes on a CPU:

1. full fine-tuning of the tiny InstructBLIP-T5 preset on a separate pretraining corpus,
   so the vision encoder, projection and language model become "pretrained";
2. the Q-Former and its query tokens are re-initialised at random, so they have to learn
   to connect them again, which is exactly what the Q-Former LoRA of the default run
   then does (on the shapes training split; the adapter's job, not this script's).

The pretraining corpus is PRETRAIN_IMAGES fresh shapes images drawn by
scripts/make_shapes.py's own renderer and question generator under another seed (the
"web-scale pretraining data" of the miniature). Any image identical to one of the
fixture's train or val images is skipped, so pretraining never sees a fixture image.
Measured (torch 2.13, transformers 5.24, ~3.5 min on one CPU thread): after pretraining
the full model answers 0.81 of the val questions (val loss 0.20); with the Q-Former
re-initialised it answers 0.44 (val loss 1.11), i.e. only what the questions alone give
away (majority answer: 0.21).

Two earlier choices made the default run learn little (val loss -38 %):
* pretraining on the 64 fixture training images alone overfits (full model: train loss
  0.04, val loss 1.18 after 120 epochs), so there was no generalising vision encoder
  and language model for a Q-Former to connect;
* the preset's own init (transformers' InstructBlipVisionConfig.initializer_range is
  1e-10, meant for loading pretrained weights, and query tokens start at zero) leaves a
  vision encoder whose output is ~1e-7 for every image: almost no image signal. The
  whole model is therefore initialised here explicitly (normal(0, 0.02) weights), which
  also keeps the result independent of how a transformers release initialises.

The result (config, safetensors weights, processor files) is written to
src/qformer_lora/resources/checkpoints/tiny-instructblip-flan-t5-shapes/ and loads offline with
presets.load_model / data.build_processor, and with plain transformers' AutoProcessor and
AutoModelForImageTextToText: the processor is completed by inference.export.complete_processor
(num_query_tokens, the image token, the image size), which a processor built from its parts
lacks. Deterministic on CPU for a given torch build. ``--processor-only`` rewrites the processor
files of an existing --out from the shipped tokenizers and leaves its weights and config as they
are (how the processor was completed without touching the weights the golden curves rest on).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import make_shapes  # noqa: E402

from qformer_lora import compat, data, forward, images, inputs, presets  # noqa: E402
from qformer_lora.inference import export  # noqa: E402
from qformer_lora.training import loader, validation  # noqa: E402
from qformer_lora.training.step import linear_warmup_decay  # noqa: E402

PRESET = "tiny-instructblip-flan-t5"
DEFAULT_OUT = REPO_ROOT / "src" / "qformer_lora" / "resources" / "checkpoints" / "tiny-instructblip-flan-t5-shapes"
PRETRAIN_IMAGES = 512  # x 3 questions; 64 images (the train split) overfit, see the docstring
PRETRAIN_SEED = 1000  # + --seed; make_shapes.SEED draws the fixture itself
INIT_STD = 0.02  # BERT/BLIP's initializer_range for every weight, vision encoder included
WARMUP_STEPS = 20


def init_weights(module: torch.nn.Module, std: float = INIT_STD) -> None:
    """normal(0, std) weights, zero biases, unit LayerNorms: the same for every release."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


def pretraining_manifest(out_dir: Path, n_images: int, seed: int) -> tuple[Path, int]:
    """Write n_images shapes images (3 questions each) and their manifest; (manifest, skipped).

    Images are drawn like make_shapes.generate draws the fixture, from another seed; an
    image pixel-identical to a fixture train/val image is skipped and another drawn.
    """
    fixture = {
        images.load_image(s.image_path).tobytes()
        for split in ("train", "val")
        for s in data.read_manifest(data.SHAPES_DIR / f"{split}.jsonl")
    }
    rng = random.Random(PRETRAIN_SEED + seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines, skipped, i = [], 0, 0
    while i < n_images:
        cells = rng.sample(make_shapes.CELL_CENTRES, rng.choice((1, 2, 3)))
        shapes = [
            (
                rng.choice(sorted(make_shapes.COLOURS)),
                rng.choice(make_shapes.SHAPES),
                cx + rng.randint(-1, 1),
                cy + rng.randint(-1, 1),
            )
            for cx, cy in cells
        ]
        rows = make_shapes.render(shapes)
        if b"".join(bytes(row) for row in rows) in fixture:
            skipped += 1
            continue
        image_rel = f"images/pretrain_{i:04d}.png"
        (out_dir / image_rel).write_bytes(make_shapes.encode_png(rows))
        for q, (instruction, answer) in enumerate(make_shapes.questions_for(rng, shapes)):
            lines.append(
                json.dumps(
                    {"id": f"pretrain-{i:04d}-{q}", "image": image_rel, "instruction": instruction, "answer": answer}
                )
            )
        i += 1
    manifest = out_dir / "pretrain.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest, skipped


def rewrite_processor(out: Path) -> int:
    """The processor files of ``out`` written again, completed, and config.json's language model class added;
    the weights untouched.

    The processor is built as ``main`` builds it (data.build_processor from the fixture tokenizers),
    completed (export.complete_processor) and saved into a staging directory, whose files then
    replace ``out``'s. config.json gains ``text_config.architectures`` alone
    (compat.name_text_architecture), edited in place so that nothing else in it moves.
    """
    model = presets.load_model(out)
    processor = data.build_processor("instructblip", image_size=model.config.vision_config.image_size)
    export.complete_processor(processor, model.config, where=str(out))
    compat.name_text_architecture(model)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["text_config"]["architectures"] = model.config.text_config.architectures
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        export.save_processor(processor, staging)
        (Path(staging) / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        for name in sorted(p.relative_to(staging) for p in Path(staging).rglob("*") if p.is_file()):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(staging) / name, out / name)
            print(f"wrote {out / name}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--images", type=int, default=PRETRAIN_IMAGES)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processor-only",
        action="store_true",
        help="rewrite only the processor files of the existing --out (weights and config untouched)",
    )
    args = parser.parse_args(argv)
    if args.processor_only:
        return rewrite_processor(args.out)
    torch.set_num_threads(1)  # tiny model: per-op overhead dominates, more threads only spin

    with tempfile.TemporaryDirectory() as corpus_dir:
        manifest, skipped = pretraining_manifest(Path(corpus_dir), args.images, args.seed)
        corpus = data.ManifestDataset(data.read_manifest(manifest))
        print(
            f"pretraining corpus: {args.images} images, {len(corpus)} questions "
            f"({skipped} draws skipped as identical to a fixture image)"
        )

        torch.manual_seed(args.seed)
        torch.use_deterministic_algorithms(True)
        model = presets.build_model(PRESET, seed=args.seed)
        with torch.no_grad():  # the vision encoder and query tokens; see the docstring
            init_weights(model.vision_model)
            torch.nn.init.normal_(model.vision_model.embeddings.class_embedding, std=INIT_STD)
            torch.nn.init.normal_(model.vision_model.embeddings.position_embedding, std=INIT_STD)
            torch.nn.init.normal_(model.query_tokens, std=INIT_STD)
        model.requires_grad_(True)
        model.eval()  # no dropout, as in the LoRA runs
        processor = data.build_processor("instructblip", image_size=model.config.vision_config.image_size)
        collator = inputs.Collator(
            processor, "instructblip", decoder_only=False, max_prompt_tokens=32, max_answer_tokens=8
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        steps_per_epoch = -(-len(corpus) // args.batch_size)
        scheduler = linear_warmup_decay(optimizer, WARMUP_STEPS, steps_per_epoch * args.epochs)
        # the order RandomSampler(generator seeded seed * 1000 + epoch) drew when this base was made
        batches = loader.EpochLoader(corpus, collator, args.batch_size, args.seed, shuffle=True)
        for epoch in range(args.epochs):
            epoch_loss = 0.0
            for batch in batches.epoch(epoch):
                loss = forward.custom_forward(model, batch).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                epoch_loss += float(loss.detach())
            print(f"pretraining epoch {epoch + 1}/{args.epochs}: loss {epoch_loss / steps_per_epoch:.4f}", flush=True)

    def evaluate(split: str) -> str:
        batches = loader.EpochLoader(data.ShapesDataset(split), collator, 16, 0, shuffle=False).epoch(0)
        m = validation.evaluate(model, batches, "fp32", torch.device("cpu"))
        return f"{split} loss {m['val_loss']:.3f} accuracy {m['val_accuracy']:.3f}"

    print("pretrained full model:", evaluate("train"), "|", evaluate("val"))
    torch.manual_seed(args.seed + 123)
    with torch.no_grad():  # step 2: a Q-Former (and queries) to train, holding nothing pretrained
        init_weights(model.qformer)
        torch.nn.init.normal_(model.query_tokens, std=INIT_STD)
    print("re-initialised Q-Former:", evaluate("train"), "|", evaluate("val"))

    # write next to the destination, then swap in: never a half-written checkpoint
    export.complete_processor(processor, model.config, where=PRESET)
    compat.name_text_architecture(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-base-", dir=args.out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        export.save_processor(processor, staging)
        if args.out.exists():
            shutil.rmtree(args.out)
        staging.rename(args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
