"""One GPU run of the end-to-end benchmark (issue 19): the trainer's loop from JPEG files against the
native loop, in under 8 minutes on an H200.

Full-size InstructBLIP-FlanT5-XL built from its preset config (random weights, nothing downloaded),
Q-Former LoRA r=8, prompt 32 / answer 16 / instruction 32 tokens, batch 64, bf16, the trainer's
default step options (run_config.TrainConfig: LM checkpointing on, torch's AdamW, deterministic
mode): batch_size x (warmup + steps) generated 640 x 480 JPEGs through the trainer's data
pipeline (DataLoader workers, pinned memory) into its own step, and the step alone on the same
batches pre-collated; then the same for HF's forward through PEFT (bench/end_to_end.py). With
MFU (bench/flops.py's counted FLOPs) and the peak memory of each. Writes
``end-to-end-<card>-<date>-bf16-b64.json`` / ``.md`` under --out (default: $OUT, else reports/gpu).

    PYTHONPATH=src python3 scripts/gpu_end_to_end.py
    python scripts/gpu_end_to_end.py --preset tiny-instructblip-flan-t5 --device cpu --steps 2   # CPU check

Should torch's deterministic mode fail on the card (an op without a deterministic kernel), the
run is repeated once without it and both reports are kept in the JSON (``deterministic_failed``).
Expected time on an H200: building the model about a minute, writing 768 JPEGs about 30 s, the
eight measurements about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qformer_lora import known_warnings  # noqa: E402 - after the path set-up above
from qformer_lora.bench import end_to_end, report_files  # noqa: E402

PRESET = "instructblip-flan-t5-xl"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The run's options (scripts/gpu_issue19.py takes them too)."""
    p.add_argument("--preset", default=PRESET, help=f"architecture preset (default: {PRESET})")
    p.add_argument("--device", default="cuda", help="cuda[:N] or cpu (default: cuda)")
    p.add_argument("--precision", default="bf16", help="precision (default: bf16)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (default: 64)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per measurement (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    p.add_argument(
        "--num-workers", type=int, default=None, help="loader workers (default: the trainer's, up to 8 on CUDA)"
    )
    p.add_argument("--out", default=None, help="report folder (default: $OUT, else reports/gpu)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_end_to_end.py", description=__doc__.split("\n\n")[0])
    return add_arguments(p).parse_args(argv)


def default_config(args: argparse.Namespace):
    """The issue's configuration with the trainer's default step options: run_config.TrainConfig."""
    [config] = end_to_end.configs(
        args.preset,
        [args.precision],
        [args.batch_size],
        lora_r=8,
        num_workers=args.num_workers,
        max_prompt_tokens=32,  # the Q-Former instruction is padded to the same budget
        max_answer_tokens=16,
    )
    return config


def measure(config, args) -> dict:
    """end_to_end.run; once more without deterministic mode if that mode broke a measurement."""
    report = end_to_end.run(config, device=args.device, steps=args.steps, warmup=args.warmup)
    errors = [t["error"] for modes in report["results"].values() for t in modes.values() if "error" in t]
    if config.deterministic and any("determinis" in e for e in errors):
        retry = end_to_end.run(
            dataclasses.replace(config, deterministic=False), device=args.device, steps=args.steps, warmup=args.warmup
        )
        retry["deterministic_failed"] = report
        return retry
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    config = default_config(args)
    started = time.perf_counter()
    with known_warnings.Recorder():  # upstream deprecation notices stay off the log
        report = measure(config, args)
    report["wall_s"] = time.perf_counter() - started
    report["command"] = " ".join(["scripts/gpu_end_to_end.py", *(argv if argv is not None else sys.argv[1:])])
    paths = report_files.write_end_to_end(report, args.out or os.environ.get("OUT") or None)
    print(f"{report['paragraph']}\ntargets: {report['targets']}\nwall {report['wall_s']:.0f} s")
    print(f"json: {paths['json']}\nmd: {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
