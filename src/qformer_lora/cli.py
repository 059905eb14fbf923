"""Command line: parses arguments and calls the modules; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import checkpoint, compat, data, lora, presets
from .bench import measurement, reporting, sweep
from .diagnostics import numerics
from .inference import generate
from .training import distributed, run_config, train


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (a batch of 0 or a --limit of -1 ran and wrote reports, or dropped a sample)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not a positive integer")
    return number


def device_name(value: str) -> str:
    """argparse type: a torch device this machine has ('cuda' without one failed deep inside torch)."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: {str(err).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    return value


def _add_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=presets.DEFAULT_PRESET,
                        help=f"architecture preset name or JSON path (default: {presets.DEFAULT_PRESET}; "
                             f"shipped: {', '.join(presets.list_presets())})")
    parser.add_argument("--scope", choices=sorted(lora.SCOPES), default="qformer",
                        help="where LoRA may go: the Q-Former only (default) or Q-Former + language model")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2*r)")
    parser.add_argument("--targets", default=",".join(lora.DEFAULT_TARGETS),
                        help="comma-separated layer names matched inside the Q-Former (default: %(default)s)")


def _spec(args) -> lora.LoraSpec:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return lora.LoraSpec(r=args.r, alpha=args.alpha if args.alpha is not None else 2 * args.r,
                         targets=targets, scope=args.scope)


def cmd_verify(args) -> int:
    spec = _spec(args)
    preset = presets.load_preset(args.preset)
    model = presets.build_model(preset, device="meta")
    report = {"preset": preset.name, "versions": compat.versions()} | lora.scope_report(
        lora.apply_lora(model, spec), spec)
    print(json.dumps(report, indent=2) if args.json else format_scope_report(report))
    return 0


def format_scope_report(report: dict) -> str:
    spec = report["lora"]
    lines = [
        f"preset {report['preset']}  (torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}, peft {report['versions']['peft']})",
        f"LoRA r={spec['r']} alpha={spec['alpha']} targets={','.join(spec['targets'])} scope={spec['scope']}",
        f"LoRA tensors:         {report['lora_tensors']:,}",
        f"trainable parameters: {report['trainable_parameters']:,} of {report['total_parameters']:,} "
        f"({report['trainable_percent']:.4f} %)",
        f"adapter dtype:        {', '.join(report['adapter_dtypes']) or '-'}",
        "",
        f"{'component':<22}{'parameters':>16}{'trainable':>14}{'LoRA tensors':>14}",
    ]
    for name, c in report["components"].items():
        lines.append(f"{name:<22}{c['parameters']:>16,}{c['trainable']:>14,}{c['lora_tensors']:>14,}")
    leaks = report["bare_name_matches_outside_qformer"]
    lines.append("")
    lines.append(f"bare target names would also match outside the Q-Former: {len(leaks)} layer(s)"
                 + (f", e.g. {', '.join(leaks[:3])}" if leaks else ""))
    return "\n".join(lines)


def cmd_train(args) -> int:
    overrides = {name: getattr(args, name) for name in run_config.TrainConfig.__dataclass_fields__
                 if getattr(args, name, None) is not None}
    config = run_config.load_run_config(args.config, overrides)
    metrics = train.train(config, resume=args.resume)
    if distributed.is_main():  # under torchrun every process returns the same metrics: print them once
        print(json.dumps(metrics, indent=2))
    return 0


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a Q-Former LoRA adapter (default: tiny InstructBLIP-T5 on the shapes data)",
                       description="Train LoRA on the Q-Former. Options come from a TOML run config (flat keys, "
                                   "the same names as the flags below with underscores) and are overridden by flags. "
                                   "Without any, the embedded default runs: the tiny InstructBLIP-T5 base in "
                                   "fixtures/checkpoints on the shapes data, on CPU in about a minute.")
    p.add_argument("--config", help="TOML run config")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint directory, or the run's latest when no path is given")
    defaults = run_config.TrainConfig()
    for name, field in run_config.TrainConfig.__dataclass_fields__.items():
        default = getattr(defaults, name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        # strings are parsed by run_config.coerce, which names the option on a bad value
        text = run_config.HELP[name]  # some say their default in words already
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar="VALUE",
                       help=text if "(default:" in text else f"{text} (default: {shown})")
    p.set_defaults(func=cmd_train)


def cmd_generate(args) -> int:
    # the inputs first: a typo should not cost the minutes of loading a full-size model
    if args.manifest:
        samples = data.read_manifest(args.manifest, args.image_root)[: args.limit]
        images, questions = [data.load_image(s.image_path) for s in samples], [s.instruction for s in samples]
        expected = [s.answer for s in samples]
    else:
        if not (args.image and args.question):
            raise ValueError("give --image and --question, or --manifest")
        images, questions, expected = [data.load_image(args.image)], [args.question], [None]
    path = checkpoint.latest_checkpoint(args.checkpoint) or args.checkpoint
    model, processor, family, _ = generate.load_trained(path)
    answers = generate.answer(model, processor, family, images, questions, max_new_tokens=args.max_new_tokens)
    for question, got, want in zip(questions, answers, expected):
        print(f"{question} -> {got}" + (f"   (expected: {want})" if want is not None else ""))
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer questions about images with a trained adapter")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--image", help="image file")
    p.add_argument("--question", help="instruction / question")
    p.add_argument("--manifest", help="JSONL manifest: answer every sample (up to --limit)")
    p.add_argument("--image-root", default=None, help="image root for --manifest (default: its directory)")
    p.add_argument("--limit", type=positive_int, default=10, help="samples from --manifest (default 10)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="longest answer in tokens (default 8)")
    p.set_defaults(func=cmd_generate)


def cmd_export(args) -> int:
    path = checkpoint.latest_checkpoint(args.checkpoint) or args.checkpoint
    print(f"merged model written to {generate.export_merged(path, args.out)}")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="merge the adapter into its base model (merge_and_unload) and save it")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="new directory for the merged model and its processor")
    p.set_defaults(func=cmd_export)


def cmd_bench(args) -> int:
    shape = measurement.SequenceShape(args.prompt_len, args.answer_len, args.instruction_len)
    if args.options_batch is not None:
        points = measurement.options_grid(args.preset or measurement.FULL_INSTRUCTBLIP, args.options_batch)
    elif args.preset is None:
        points = measurement.default_points()
    else:
        points = measurement.grid(args.preset, scopes=args.scope, precisions=args.precision, forwards=args.forward,
                            lm_activation_checkpointing=args.lm_checkpointing, family=args.family,
                            validate_budget_gib=args.validate_budget_gib, feature_cache=args.feature_cache,
                            fused_optimizer=args.fused_optimizer, compile_qformer=args.compile_qformer,
                            compile_frozen=args.compile_frozen)
    report, paths = sweep.run_benchmark(points, tuple(args.batch_sizes), device=args.device, shape=shape,
                                        report_dir=args.out, steps=args.steps)
    print(report["paragraph"])
    reporting.print_paths(paths)
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="peak memory and step time against batch size; writes JSON/Markdown/PNG reports",
                       description="Train a few LoRA steps on a randomly initialised preset per configuration and "
                                   "batch size, fit peak memory = a + b x batch, predict the max batch for 24/40/80 GiB "
                                   "and write reports. Without --preset: the built-in GPU grid (full-size "
                                   "InstructBLIP-FlanT5-XL and BLIP-2-FlanT5-XL, the seed's table).")
    p.add_argument("--preset", default=None, help="sweep one preset (default: the built-in grid)")
    p.add_argument("--family", choices=sorted(presets.FAMILIES), default=None,
                   help="build the preset's config as this family")
    p.add_argument("--scope", nargs="+", choices=sorted(lora.SCOPES), default=["qformer"],
                   help="LoRA scopes to sweep (default: qformer)")
    p.add_argument("--precision", nargs="+", choices=sorted(measurement.PRECISIONS), default=["bf16"],
                   help="precisions to sweep (default: bf16)")
    p.add_argument("--forward", nargs="+", choices=measurement.FORWARDS, default=["custom"],
                   help="custom forward or the library's own (through a plain PeftModel)")
    p.add_argument("--lm-checkpointing", action="store_true", help="activation checkpointing in the language model")
    p.add_argument("--feature-cache", action="store_true", help="vision features from a warm in-memory cache")
    p.add_argument("--fused-optimizer", action="store_true", help="AdamW(fused=True) where available")
    p.add_argument("--compile-qformer", action="store_true",
                   help="torch.compile the Q-Former (static shapes; compiled at each batch size's warm-up step)")
    p.add_argument("--compile-frozen", action="store_true",
                   help="torch.compile each block of the frozen vision encoder and language model (as above)")
    p.add_argument("--options-batch", type=positive_int, default=None, metavar="N",
                   help="only the step-option table at batch N (the GPU grid's is 64): the native forward and "
                        "each option of the grid on --preset (default: full-size InstructBLIP-FlanT5-XL); the "
                        "scope, precision and option flags above are ignored")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4, 8, 16], metavar="N",
                   help="batch sizes per configuration, run ascending until one runs out of memory "
                        "(default: 1 4 8 16)")
    p.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens per sample (default 32)")
    p.add_argument("--answer-len", type=positive_int, default=16, help="answer tokens per sample (default 16)")
    p.add_argument("--instruction-len", type=positive_int, default=32,
                   help="InstructBLIP Q-Former instruction tokens (default 32)")
    p.add_argument("--steps", type=positive_int, default=3,
                   help="measured steps per point after one warm-up (default 3)")
    p.add_argument("--validate-budget-gib", type=float, default=None,
                   help="check the predicted max batch under this memory cap (CUDA only)")
    p.add_argument("--device", type=device_name, default="cuda", help="cuda[:N] or cpu (default: cuda)")
    p.add_argument("--out", default=None, help="report folder (default: $QFORMER_LORA_REPORT_DIR or reports/gpu)")
    p.set_defaults(func=cmd_bench)


def cmd_reproduce(args) -> int:
    from .repro import reproduce

    report = reproduce.run(args.only)
    if not args.only:  # a partial run does not overwrite the full report
        md, js = reproduce.write(report, args.out)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for name, item in report["items"].items():
            print(f"{name:<15} {item['status']:<17} fix holds: {'yes' if item['fix_holds'] else 'NO'}\n"
                  f"{'':<15} {item['why']}")
        if not args.only:
            print(f"\nreport: {md} (and {js.name})")
    return 0 if report["all_fixes_hold"] else 1


def add_reproduce_parser(sub) -> None:
    from .repro import reproduce

    p = sub.add_parser("reproduce", help="replay every failure the seed documents and its fix; write the report",
                       description="Run each documented failure and its fix on the embedded tiny presets (CPU, "
                                   "a few minutes at most) and write reports/REPRODUCTION.md and .json. Exit "
                                   "status 1 when a fix does not hold.")
    p.add_argument("--only", nargs="+", choices=list(reproduce.ITEMS), metavar="NAME",
                   help=f"run only these items ({', '.join(reproduce.ITEMS)})")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default=str(reproduce.REPORTS_DIR), help="report folder (default: %(default)s)")
    p.set_defaults(func=cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer-lora", description=(
        "LoRA on the Q-Former of InstructBLIP / BLIP-2, with the documented failures reproduced and guarded: "
        "train, generate, export, check a setting (doctor, verify), measure memory and speed (bench), "
        "replay every documented failure (reproduce)."))
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="build a preset on the meta device, apply LoRA, print the scope report",
                            description="Build the preset without allocating memory (meta device), apply LoRA "
                                        "within the chosen scope and print where the adapter went.")
    _add_lora_options(verify)
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify)
    _add_doctor_parser(sub)
    add_train_parser(sub)
    add_generate_parser(sub)
    add_export_parser(sub)
    add_bench_parser(sub)
    add_reproduce_parser(sub)
    return parser


# ----------------------------------------------------------------------------- doctor


def cmd_doctor(args) -> int:
    """Print the precision doctor's findings; exit status 1 if any finding is fatal."""
    import torch

    from .diagnostics import doctor

    defaults = run_config.TrainConfig()
    config = run_config.TrainConfig(
        preset=args.preset, base_checkpoint=args.base_checkpoint, precision=args.precision,
        lr=defaults.lr if args.lr is None else args.lr,
        adam_eps=defaults.adam_eps if args.adam_eps is None else args.adam_eps,
        weight_decay=defaults.weight_decay if args.weight_decay is None else args.weight_decay)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    findings = doctor.examine(config, device=device)
    fatal = sum(f.severity == doctor.FATAL for f in findings)
    if args.json:
        print(json.dumps({"preset": config.preset, "base_checkpoint": config.base_checkpoint,
                          "precision": config.precision, "lr": config.lr,
                          "adam_eps": config.adam_eps, "weight_decay": config.weight_decay, "device": device,
                          "fatal": fatal, "findings": doctor.as_json(findings)}, indent=2))
    else:
        print(f"precision doctor: preset {config.preset}, precision {config.precision}, lr {config.lr:g}, "
              f"eps {config.adam_eps:g}, weight decay {config.weight_decay:g}, device {device}")
        for finding in findings:
            print(finding)
        print(f"{fatal} fatal, {len(findings) - fatal} warning(s)" if findings else "no findings")
    return 1 if fatal else 0


def _add_doctor_parser(sub) -> None:
    from .diagnostics import doctor

    parser = sub.add_parser("doctor", help="check a precision setting for known numerical failures",
                            description="Flag dtype/optimizer combinations known to produce NaN/inf (fp16 "
                                        "adapters, eps that rounds to 0, T5 in fp16, bf16 without hardware "
                                        "support). Exit status 1 if any finding is fatal.")
    parser.add_argument("--preset", default="tiny-instructblip-flan-t5",
                        help="architecture preset name or JSON path (default: %(default)s)")
    parser.add_argument("--base-checkpoint", default=None,
                        help="local checkpoint directory to check instead of --preset (its config.json)")
    parser.add_argument("--precision", choices=list(doctor.PRECISION_DTYPES), default="fp32",
                        help="training precision to check (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the training default)")
    parser.add_argument("--adam-eps", type=float, default=None, help="AdamW epsilon (default: the training default)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="AdamW weight decay (default: the training default)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(func=cmd_doctor)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # user mistakes and their diagnoses, without a traceback; OSError: a path that exists, is
    # missing, is a file where a directory was named, cannot be written, or an image that
    # cannot be decoded (data.ImageLoadError is an OSError)
    except (presets.PresetError, lora.ScopeError, run_config.ConfigError, data.ManifestError,
            checkpoint.CheckpointError, numerics.NonFiniteError, OSError, ValueError) as err:
        print(f"qformer-lora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
