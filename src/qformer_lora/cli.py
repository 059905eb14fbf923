"""Command line: parses arguments and calls the workflows; no logic of its own.

One vocabulary across subcommands (``cli_options.py``): an option that means the same thing
has the same flag, value style and default everywhere. Each subcommand is a ``cmd_*`` function
and its ``add_*_parser``. Workflows are imported inside the command that runs them, so
``train`` does not import the benchmark stack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import checkpoint, data, formats, images, jsonio, known_warnings, lora, precision, presets, tasks, untrained
from .cli_options import (
    AUTO,
    add_data_options,
    add_device_option,
    add_generation_options,
    boolean,
    config_option,
    generation_options,
    lora_spec,
    metavar,
    positive_int,
    resolve_device,
)
from .diagnostics.numerics import NonFiniteError
from .training import run_config

# ----------------------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    from . import compat
    from .repro import release_diff

    release = release_diff.announce_if_unrecorded()  # stderr, once; None on a recorded release
    spec = lora_spec(args)
    preset = presets.load_preset(args.preset)
    model = presets.build_model(preset, device="cpu" if args.probe else "meta")
    peft_model = lora.apply_lora(model, spec)
    report = {"preset": preset.name, "versions": compat.versions()} | lora.scope_report(peft_model, spec)
    report["untrainable"] = untrained.untrainable_report(peft_model)  # the probe runs where there are values
    if release is not None:
        report["release"] = release
    if args.json:
        print(jsonio.dumps(report, indent=2))
    else:
        print(lora.format_scope_report(report) + "\n\n" + untrained.format_report(report["untrainable"]))
    return 0


def add_verify_parser(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="build a preset on the meta device, apply LoRA, print the scope report",
        description="Build the preset without allocating memory (meta device), apply LoRA "
        "within the chosen scope and print where the adapter went, and which of its adapters can never get "
        "a gradient (by structure; with --probe true also by a probe backward).",
    )
    p.add_argument(
        "--preset",
        default=presets.DEFAULT_PRESET,
        metavar=metavar("preset"),
        help=f"architecture preset name or JSON path (default: {presets.DEFAULT_PRESET}, the model "
        f"the seed's counts are for; shipped: {', '.join(presets.list_presets())})",
    )
    for name in ("lora_r", "lora_alpha", "lora_dropout", "targets", "scope", "exclude_untrainable"):
        config_option(p, name)
    p.add_argument(
        "--probe",
        type=boolean,
        default=False,
        metavar="{true,false}",
        help="build the preset on the CPU (random init, seed 0) instead of the meta device, so the probe backward "
        "can look for adapters that get no gradient; a full-size preset then needs its full memory, 4 bytes a "
        "parameter (default: false: only the adapters untrainable by structure are listed)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)


# ----------------------------------------------------------------------------- doctor


def cmd_doctor(args) -> int:
    """Print the precision doctor's findings; exit status 1 if any finding is fatal."""
    from .diagnostics import doctor
    from .repro import release_diff

    release = release_diff.announce_if_unrecorded()  # stderr, once; None on a recorded release

    config = run_config.TrainConfig(
        preset=args.preset,
        base_checkpoint=args.base_checkpoint,
        precision=args.precision,
        lr=args.lr,
        adam_eps=args.adam_eps,
        weight_decay=args.weight_decay,
    )
    device = resolve_device(args.device)
    findings = doctor.examine(config, device=device)
    if config.base_checkpoint:  # the checkpoint's files: weights that will not load, pre-4.45 configs
        findings += doctor.checkpoint_findings(config.base_checkpoint)
    summary = doctor.summary(config, device, findings)
    if release is not None:
        summary["release"] = release
    print(jsonio.dumps(summary, indent=2) if args.json else doctor.format_summary(summary))
    fatal = summary["fatal"]
    return 1 if fatal else 0


def add_doctor_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check a precision setting for known numerical failures",
        description="Flag dtype/optimizer combinations known to produce NaN/inf (fp16 "
        "adapters, eps that rounds to 0, T5 in fp16, bf16 without hardware "
        "support). Exit status 1 if any finding is fatal. The defaults are train's.",
    )
    for name in ("preset", "base_checkpoint", "precision", "lr", "adam_eps", "weight_decay"):
        config_option(p, name)
    add_device_option(p)
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=cmd_doctor)


# ----------------------------------------------------------------------------- train, report, generate, export


def cmd_train(args) -> int:
    from .training import distributed, train

    overrides = {
        name: getattr(args, name)
        for name in run_config.TrainConfig.__dataclass_fields__
        if getattr(args, name, None) is not None
    }
    config = run_config.load_run_config(args.config, overrides)
    metrics = train.train(config, resume=args.resume, device=None if args.device == AUTO else args.device)
    if distributed.is_main():  # under torchrun every process returns the same metrics: print them once
        if args.json:
            print(jsonio.dumps(metrics, indent=2))
        _report_run(config.output_dir, quiet=args.json)
    return 0


def _report_run(directory: str, quiet: bool = False) -> None:
    """Draw the run's curves.png and print its summary (``quiet``: the curves alone; notes to stderr)."""
    from .plotting import missing
    from .training import curves, summary

    path = curves.write(directory)
    if not quiet:
        print(summary.format_summary(summary.summarise(directory)))
    if path is None:
        print(missing(f"{directory}/{curves.CURVES_FILE}"), file=sys.stderr)
    elif not quiet:
        print(f"curves: {path} (redraw: qformer-lora report {directory})")


def cmd_report(args) -> int:
    if args.json:
        from .training import summary

        print(jsonio.dumps(summary.summarise(args.run_dir), indent=2))
    _report_run(args.run_dir, quiet=args.json)
    return 0


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="summarise a training run and redraw its curves.png",
        description="Print a run's summary (adapter path, best and last validation loss and accuracy with "
        "their epochs, wall time, samples/s), as train prints it at its end, and redraw curves.png "
        "(loss, accuracy, learning rate) from its metrics.jsonl. The figure needs matplotlib "
        "(qformer-lora[bench]).",
    )
    p.add_argument("run_dir", help="a run directory (train's --output-dir)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_report)


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a Q-Former LoRA adapter (default: tiny InstructBLIP-T5 on the shapes data)",
        description="Train LoRA on the Q-Former. Options come from a TOML run config (flat keys, "
        "the same names as the flags below with underscores) and are overridden by flags. "
        "Without any, the embedded default runs: the tiny InstructBLIP-T5 base in "
        "resources/checkpoints on the shapes data, on CPU in about a minute.",
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML run config: flat keys named as the flags below, with underscores (default: none)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT_DIR",
        help="continue from a checkpoint directory, or the run's latest when no path is given (default: a new run)",
    )
    add_device_option(p)
    p.add_argument(
        "--json", action="store_true", help="print the last epoch's metrics as JSON instead of the run's summary"
    )
    for name in run_config.TrainConfig.__dataclass_fields__:
        config_option(p, name, overrides=True)
    p.set_defaults(func=cmd_train)


def cmd_generate(args) -> int:
    from .inference import generate

    path = _generate_source(args)
    # the inputs first: a typo should not cost the minutes of loading a full-size model
    pictures, questions, expected = _generate_inputs(args, lambda: _run_config(generate, path))
    config = None  # an adapter trained elsewhere or a saved model: TrainConfig's budgets
    if args.adapter is not None:
        model, processor, _, report = generate.load_adapter(args.adapter, args.base_checkpoint)
        print(lora.format_scope_report(report), end="\n\n", file=sys.stderr)  # stdout: the answers alone
    elif path is None:
        model, processor, _ = generate.load_merged(args.base_checkpoint)
    else:
        model, processor, _, config = generate.load_trained(path)
    model.to(resolve_device(args.device))
    builder = generate.collator(model, processor, config or vars(run_config.TrainConfig()))
    answers = tasks.answer(model, builder, pictures, questions, generation_options(args), True)
    for question, got, want in zip(questions, answers, expected):
        print(f"{question} -> {got}" + (f"   (expected: {want})" if want is not None else ""))
    return 0


def _generate_source(args):
    """The training checkpoint to answer with, or None for --adapter / --base-checkpoint alone."""
    if args.checkpoint is not None:
        if args.adapter is not None or args.base_checkpoint is not None:
            raise ValueError(
                f"{args.checkpoint}: a training checkpoint brings its own adapter and base; "
                f"--adapter and --base-checkpoint are for models trained elsewhere"
            )
        return checkpoint.latest_checkpoint(args.checkpoint) or args.checkpoint
    if args.adapter is None and args.base_checkpoint is None:
        raise ValueError("name a training checkpoint or run, --adapter DIR, or --base-checkpoint DIR")
    return None


def _run_config(generate, path) -> dict:
    if path is None:
        raise ValueError(
            "--adapter / --base-checkpoint: no run to take validation data from; give --manifest, "
            "or --image and --question"
        )
    return generate.run_config(path)


def _generate_inputs(args, run_config) -> tuple[list, list, list]:
    """(images, questions, expected answers or None): --image/--question, --manifest, or by default
    the run's own validation data (so a run answers out of the box, wherever it was installed)."""
    if args.image or args.question:
        if not (args.image and args.question):
            raise ValueError("--image and --question go together")
        return [images.load_image(args.image)], [args.question], [None]
    manifest, image_root, data_format = args.manifest, args.image_root, args.data_format
    if manifest is None:
        config = run_config()  # read only here: --image or --manifest need no checkpoint to be checked
        manifest, image_root = config["val_manifest"], config.get("image_root")
        if data_format == formats.AUTO:  # the format the run was trained with
            data_format = config.get("data_format", formats.AUTO)
    samples = formats.read(manifest, data_format, image_root, split="val")[: args.limit]
    return (
        [images.load_image(s.image_path) for s in samples],
        [s.instruction for s in samples],
        [s.answer for s in samples],
    )


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="answer questions about images with a trained adapter",
        description="Answer with a training checkpoint of ours (CHECKPOINT), with a LoRA adapter trained "
        "elsewhere with plain PEFT (--adapter DIR on --base-checkpoint DIR; a scope report of what it "
        "touches goes to stderr), or with a saved model as it is, such as a merged export "
        "(--base-checkpoint DIR alone).",
    )
    p.add_argument("checkpoint", nargs="?", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="a PEFT LoRA adapter directory (adapter_config.json + weights) trained elsewhere on the Q-Former "
        "(default: none, CHECKPOINT's adapter)",
    )
    p.add_argument(
        "--base-checkpoint",
        metavar=metavar("base_checkpoint"),
        help="local InstructBLIP/BLIP-2 checkpoint directory: the base of --adapter (default: the one its "
        "adapter_config.json records), or the model to answer with when there is no adapter",
    )
    p.add_argument("--image", metavar="FILE", help="image file, with --question (default: none)")
    p.add_argument("--question", metavar="TEXT", help="instruction / question about --image (default: none)")
    add_data_options(p)
    p.add_argument(
        "--limit", type=positive_int, default=10, metavar="INT", help="samples from the manifest (default: 10)"
    )
    add_generation_options(p)
    add_device_option(p)
    p.set_defaults(func=cmd_generate)


def cmd_export(args) -> int:
    from .inference import export

    path = checkpoint.latest_checkpoint(args.checkpoint) or args.checkpoint
    print(f"merged model written to {export.export_merged(path, args.out, resolve_device(args.device))}")
    return 0


def cmd_evaluate(args) -> int:
    from .inference import evaluate, generate

    if (args.checkpoint is None) == (args.base_checkpoint is None and args.adapter is None):
        raise ValueError(
            "give a run (or checkpoint) directory, --adapter DIR (a plain PEFT adapter), or --base-checkpoint DIR "
            "alone for a base's zero-shot figures"
        )
    path = (checkpoint.latest_checkpoint(args.checkpoint) or Path(args.checkpoint)) if args.checkpoint else None
    # the data first: a typo should not cost the minutes of loading a full-size model
    config = generate.run_config(path) if path else vars(run_config.TrainConfig())
    samples, data_format, manifest = _evaluation_data(args, config)
    budgets = {k: getattr(args, k) or config[k] for k in ("max_prompt_tokens", "max_answer_tokens")}
    if path and budgets != {k: config[k] for k in budgets}:
        raise ValueError("a run is evaluated with the budgets it trained with: drop --max-prompt/answer-tokens")
    model, builder, _, name = evaluate.load(
        path, args.base_checkpoint, budgets, resolve_device(args.device), adapter=args.adapter
    )
    task, options = tasks.task_of(samples, data_format), generation_options(args)
    results, records = tasks.evaluate(model, builder, samples, task, options)
    document = evaluate.report(
        results, task=task, samples=len(records), source=name, data_path=str(manifest), options=options
    )
    default_out = path.parent.parent / "evaluation" if path else Path("evaluation")  # <run>/checkpoints/<ckpt>
    out = evaluate.write(args.out or default_out, document, records)
    print(evaluate.markdown(document) + f"\nwritten to {out}/ (predictions.jsonl, results.json, results.md)")
    return 0


def _evaluation_data(args, config: dict) -> tuple[list, str, str]:
    """(samples, resolved format, path): --manifest in --data-format, by default the run's validation data."""
    manifest = args.manifest or config["val_manifest"]
    data_format = args.data_format
    if data_format == formats.AUTO and not args.manifest:  # the run's own data: the format it trained with
        data_format = config.get("data_format", formats.AUTO)
    data_format = formats.detect(manifest) if data_format == formats.AUTO else data_format
    samples = formats.read(manifest, data_format, args.image_root or config.get("image_root"), split="val")
    return (samples[: args.limit] if args.limit else samples), data_format, manifest


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="task metrics (VQA accuracy, multiple choice, BLEU-4 / CIDEr-D, exact match) of a run or a base",
    )
    p.add_argument("checkpoint", nargs="?", help="a run or checkpoint directory (its latest checkpoint)")
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="a PEFT LoRA adapter directory trained elsewhere on the Q-Former (default: none, CHECKPOINT's adapter)",
    )
    p.add_argument(
        "--base-checkpoint",
        metavar=metavar("base_checkpoint"),
        help="the base of --adapter (default: the one its adapter_config.json records), or alone a base or "
        "merged checkpoint to evaluate as saved (a base's zero-shot figures)",
    )
    add_data_options(p)
    p.add_argument(
        "--limit", type=positive_int, default=None, metavar="INT", help="first N samples only (default: none = all)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="report folder (default: <run>/evaluation, or ./evaluation for a base)",
    )
    for name in ("max_prompt_tokens", "max_answer_tokens"):
        config_option(p, name, overrides=True)
    add_generation_options(p)
    add_device_option(p)
    p.set_defaults(func=cmd_evaluate)


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="merge the adapter into its base model (merge_and_unload) and save it with a model card",
        description="Merge a checkpoint's adapter into its base and write a directory that plain transformers "
        "loads as is (AutoProcessor + the model class's generate): the merged weights, a complete "
        "processor (num_query_tokens, image token, image size) and a README.md model card with the "
        "hub's metadata, the adapter, the training data, the run's validation figures and a usage snippet.",
    )
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("out", help="new directory for the merged model, its processor and model card")
    add_device_option(p)
    p.set_defaults(func=cmd_export)


# ----------------------------------------------------------------------------- bench


def bench_points(args, measurement) -> list:
    """The sweep's configurations from the bench flags."""
    if args.feature_cache == "disk":
        raise ValueError("--feature-cache disk: the benchmark measures the in-memory cache; use memory")
    if args.options_batch is not None:
        return measurement.options_grid(args.preset or measurement.FULL_INSTRUCTBLIP, args.options_batch)
    if args.preset is None:
        return measurement.default_points()
    return measurement.grid(
        args.preset,
        scopes=args.scopes,
        precisions=args.precisions,
        forwards=args.forwards,
        lm_activation_checkpointing=args.lm_checkpointing,
        family=args.family,
        validate_budget_gib=args.validate_budget_gib,
        feature_cache=args.feature_cache == "memory",
        fused_optimizer=bool(args.fused_optimizer),
        compile_qformer=args.compile_qformer,
        compile_frozen=args.compile_frozen,
    )


def _bench_device(args) -> str:
    """--device resolved; a full-size default on a CPU is refused."""
    device = resolve_device(args.device)
    if args.preset is None and torch.device(device).type == "cpu":
        raise ValueError(
            f"--device {args.device}: without --preset the built-in grid builds full-size models (about 4B "
            f"parameters each; --end-to-end, InstructBLIP-FlanT5-XL) for a GPU; on a CPU pass --preset with a tiny "
            f"preset (tiny-instructblip-flan-t5)"
        )
    return device


def cmd_bench(args) -> int:
    from .bench import measurement, report_files, sweep

    if args.end_to_end:
        return cmd_bench_end_to_end(args)
    if args.sync_every:
        raise ValueError(f"--sync-every {args.sync_every} applies to --end-to-end only (see --help)")
    device = _bench_device(args)
    points = bench_points(args, measurement)
    shape = measurement.SequenceShape(args.prompt_len, args.answer_len, args.instruction_len)
    report, paths = sweep.run_benchmark(
        points, tuple(args.batch_sizes), device=device, shape=shape, report_dir=args.out, steps=args.steps
    )
    print(report["paragraph"])
    report_files.print_paths(paths)
    return 0


def cmd_bench_end_to_end(args) -> int:
    from .bench import end_to_end, measurement, report_files

    device = _bench_device(args)
    sweep_only = [
        flag
        for flag, given in (
            ("--options-batch", args.options_batch is not None),
            ("--validate-budget-gib", args.validate_budget_gib is not None),
            ("--family", args.family is not None),
            ("--forwards", args.forwards != ["custom"]),  # end to end measures both forwards
            ("--scopes", len(args.scopes) > 1),
            ("--instruction-len", args.instruction_len != args.prompt_len),  # padded to the prompt budget
        )
        if given
    ]
    if sweep_only:
        raise ValueError(f"--end-to-end: {', '.join(sweep_only)} apply to the sweep only (see --help)")
    configs = end_to_end.configs(
        args.preset or measurement.FULL_INSTRUCTBLIP,
        args.precisions,
        args.batch_sizes,
        scope=args.scopes[0],
        num_workers=args.num_workers,
        lm_checkpointing=args.lm_checkpointing,
        fused_optimizer=args.fused_optimizer,
        compile_qformer=args.compile_qformer,
        compile_frozen=args.compile_frozen,
        feature_cache=args.feature_cache,
        sync_every=args.sync_every,
        max_prompt_tokens=args.prompt_len,
        max_answer_tokens=args.answer_len,
    )
    for config in configs:
        report = end_to_end.run(config, device=device, steps=args.steps)
        paths = report_files.write_end_to_end(report, args.out)
        print(f"{report['paragraph']}\njson: {paths['json']}\nmd: {paths['md']}")
    return 0


# the run-config options bench takes; sync_every with --end-to-end only (the sweep's step reads every step)
BENCH_STEP_OPTIONS = (
    "lm_checkpointing",
    "feature_cache",
    "fused_optimizer",
    "compile_qformer",
    "compile_frozen",
    "sync_every",
)


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="peak memory and step time against batch size; writes JSON/Markdown/PNG reports",
        description="Train a few LoRA steps (the trainer's own step) on a randomly initialised preset "
        "per configuration and batch size, fit peak memory = a + b x batch, predict the "
        "max batch for 24/40/80 GiB and write reports. Without --preset: the built-in GPU "
        "grid (full-size InstructBLIP-FlanT5-XL and BLIP-2-FlanT5-XL, the seed's table).",
    )
    p.add_argument(
        "--preset", default=None, metavar=metavar("preset"), help="sweep one preset (default: the built-in grid)"
    )
    p.add_argument(
        "--family",
        choices=sorted(presets.FAMILIES),
        default=None,
        help="build the preset's config as this family (default: the preset's own)",
    )
    p.add_argument(
        "--scopes",
        nargs="+",
        choices=sorted(lora.SCOPES),
        default=["qformer"],
        help="LoRA scopes to sweep (default: qformer)",
    )
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=precision.SAFE_NAMES,
        default=["bf16"],
        help="precisions to sweep (default: bf16)",
    )
    p.add_argument(
        "--forwards",
        nargs="+",
        choices=("custom", "native"),
        default=["custom"],
        help="custom forward or the library's own (through a plain PeftModel) (default: custom)",
    )
    for name in BENCH_STEP_OPTIONS:
        config_option(p, name)
    p.add_argument(
        "--end-to-end",
        type=boolean,
        nargs="?",
        const=True,
        default=False,
        metavar="{true,false}",
        help="instead of the sweep, time the trainer's loop from generated COCO-sized JPEG files (the data "
        "pipeline with --num-workers workers, then the trainer's step) and the step alone, against HF's forward "
        "through PEFT on the same data, for each of --precisions x --batch-sizes with the step options above; "
        "writes end-to-end-<card>-<date>-<precision>-b<batch>.json/.md (default: false)",
    )
    config_option(p, "num_workers")
    _add_bench_sizes(p)
    add_device_option(p)
    p.add_argument(
        "--out", default=None, metavar="DIR", help="report folder (default: $QFORMER_LORA_REPORT_DIR or reports/gpu)"
    )
    p.set_defaults(func=cmd_bench)


def _add_bench_sizes(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--options-batch",
        type=positive_int,
        default=None,
        metavar="INT",
        help="only the step-option table, at this batch size (the GPU grid's is 64): the native forward "
        "and each option of the grid on --preset (full-size InstructBLIP-FlanT5-XL when not given); the "
        "scope, precision and option flags above are ignored (default: none, the whole sweep)",
    )
    p.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=[1, 4, 8, 16],
        metavar="INT",
        help="batch sizes per configuration, run ascending until one runs out of memory (default: 1 4 8 16)",
    )
    for flag, default, what in (
        ("--prompt-len", 32, "prompt tokens per sample"),
        ("--answer-len", 16, "answer tokens per sample"),
        ("--instruction-len", 32, "InstructBLIP Q-Former instruction tokens per sample"),
        ("--steps", 3, "measured optimizer steps per point, after one warm-up step"),
    ):
        p.add_argument(flag, type=positive_int, default=default, metavar="INT", help=f"{what} (default: {default})")
    p.add_argument(
        "--validate-budget-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="check the predicted max batch under this memory cap, in GiB (CUDA only; default: none, no check)",
    )


# ----------------------------------------------------------------------------- reproduce


def cmd_reproduce(args) -> int:
    from .repro import reproduce

    if args.base_checkpoint is not None:  # every item on the user's checkpoint, its own report file
        from .repro import user_checkpoint

        report = user_checkpoint.run(args.base_checkpoint, resolve_device(args.device), args.precision, args.only)
        stem = user_checkpoint.report_stem(report)
    else:
        report, stem = reproduce.run(args.only), "REPRODUCTION"
    if not args.only:  # a partial run does not overwrite the full report
        md, js = reproduce.write(report, args.out, stem)
    if args.json:
        print(jsonio.dumps(report, indent=2, default=str))
    else:
        for line in reproduce.release_lines(report):  # once: an unrecorded release, compared with a recorded one
            print(line)
        print(reproduce.format_summary(report))
        if not args.only:
            print(f"\nreport: {md} (and {js.name})")
    return 0 if report["all_fixes_hold"] else 1


def add_reproduce_parser(sub) -> None:
    from .repro import reproduce

    p = sub.add_parser(
        "reproduce",
        help="replay every failure the seed documents and its fix; write the report",
        description="Run each documented failure and its fix on the embedded tiny presets (CPU, "
        "a few minutes at most) and write reports/REPRODUCTION.md and .json. Exit "
        "status 1 when a fix does not hold.",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(reproduce.ITEMS),  # --base-checkpoint runs all but task-gain (the shapes task's own base)
        metavar="ITEM",
        help=f"run only these items, of {', '.join(reproduce.ITEMS)} (default: all; a partial run writes no report)",
    )
    p.add_argument(
        "--base-checkpoint",
        metavar=metavar("base_checkpoint"),
        help="run the items on this local InstructBLIP/BLIP-2 checkpoint with the installed releases: scope and "
        "counts on the meta device, the others on --device where the model fits (each item says where it ran); "
        "writes REPRODUCTION-<name>-<config hash>.md (default: none, the embedded tiny presets)",
    )
    config_option(p, "precision")
    add_device_option(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--out", default=str(reproduce.REPORTS_DIR), metavar="DIR", help="report folder (default: %(default)s)"
    )
    p.set_defaults(func=cmd_reproduce)


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qformer-lora",
        description=(
            "LoRA on the Q-Former of InstructBLIP / BLIP-2, with the documented failures reproduced and guarded: "
            "train (ending with a summary and curves.png; report shows them again), generate, export, check a "
            "setting (doctor, verify), measure memory and speed (bench), "
            "replay every documented failure (reproduce)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_verify_parser,
        add_doctor_parser,
        add_train_parser,
        add_report_parser,
        add_generate_parser,
        add_evaluate_parser,
        add_export_parser,
        add_bench_parser,
        add_reproduce_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # upstream warnings the user cannot act on stay off the terminal (known_warnings.py);
        # train and reproduce record them in their log and report
        with known_warnings.Recorder():
            return args.func(args)
    # user mistakes and their diagnoses, without a traceback; OSError: a path that exists, is
    # missing, is a file where a directory was named, cannot be written, or an image that
    # cannot be decoded (images.ImageLoadError is an OSError)
    except (
        presets.PresetError,
        lora.ScopeError,
        run_config.ConfigError,
        data.ManifestError,
        checkpoint.CheckpointError,
        NonFiniteError,
        OSError,
        ValueError,
    ) as err:
        print(f"qformer-lora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
