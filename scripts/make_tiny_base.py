"""Make the tiny "pretrained" base checkpoint the embedded default run starts from.

Why: a randomly initialised, frozen language model cannot be steered by a Q-Former
adapter (measured: loss stalls, accuracy 0), so a LoRA run on it shows nothing. Real
InstructBLIP/BLIP-2 fine-tuning starts from a pretrained vision encoder and language
model, and BLIP-2's second stage trains the Q-Former between them. This script builds
that situation in miniature, in seconds on a CPU:

1. full fine-tuning of the tiny InstructBLIP-T5 preset on the shapes training split,
   so the vision encoder, projection and language model become "pretrained";
2. the Q-Former is re-initialised, so it has to learn to connect them again, which is
   exactly what the Q-Former LoRA of the default run then does.

The result (config, safetensors weights, processor files) is written to
fixtures/checkpoints/tiny-instructblip-flan-t5-shapes/ and loads offline with
presets.load_model / data.build_processor. Deterministic on CPU for a given torch build.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from qformer_lora import data, forward, presets, train  # noqa: E402

PRESET = "tiny-instructblip-flan-t5"
DEFAULT_OUT = REPO_ROOT / "fixtures" / "checkpoints" / "tiny-instructblip-flan-t5-shapes"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = presets.build_model(PRESET, seed=args.seed)
    model.requires_grad_(True)
    model.eval()  # no dropout, as in the LoRA runs
    processor = data.build_processor("instructblip", image_size=model.config.vision_config.image_size)
    collator = data.Collator(processor, "instructblip", decoder_only=False, max_prompt_tokens=32, max_answer_tokens=8)
    dataset = data.ManifestDataset(data.read_manifest(data.SHAPES_DIR / "train.jsonl"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        for batch in train.make_loader(dataset, collator, 16, args.seed, epoch, shuffle=True):
            forward.custom_forward(model, batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        print(f"pretraining epoch {epoch + 1}/{args.epochs}", end="\r", flush=True)
    print()

    fresh = presets.build_model(PRESET, seed=args.seed + 123)
    model.qformer.load_state_dict(fresh.qformer.state_dict())  # step 2: a Q-Former to train

    # write next to the destination, then swap in: never a half-written checkpoint
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-base-", dir=args.out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
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
