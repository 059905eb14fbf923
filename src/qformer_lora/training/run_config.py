"""The training run's options: TrainConfig, their help texts, and reading them from TOML + flags.

Split from training/train.py so that module is the loop alone. Every option is a TrainConfig field
with a HELP line (the CLI builds its flags from both); values from a TOML file or a flag go
through ``coerce``, which names the file or flag, the option and the expected type when a
value does not fit, and ``load_run_config`` checks the options with a fixed set of choices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import data, formats, lora, precision, presets, quantization, tasks
from . import step_options

# A random frozen language model cannot be steered by a Q-Former adapter, so the embedded
# default starts from a tiny "pretrained" base (scripts/make_tiny_base.py explains how).
TINY_BASE_CHECKPOINT = presets.RESOURCES_DIR / "checkpoints" / "tiny-instructblip-flan-t5-shapes"
GUARDS = ("raise", "skip", "rollback")
IMAGE_DECODES = ("exact", "draft")
LOGS = ("jsonl", "tensorboard")  # where the metrics go: metrics.jsonl always, + TensorBoard event files
AUTO_BATCH = "auto"  # --batch-size auto: training/auto_batch.py picks the largest micro-batch that fits
WORDS = {"batch_size": (AUTO_BATCH,)}  # words a number option also takes


@dataclass
class TrainConfig:
    preset: str = "tiny-instructblip-flan-t5"  # used when base_checkpoint is none
    base_checkpoint: str | None = str(TINY_BASE_CHECKPOINT)
    train_manifest: str = str(data.SHAPES_DIR / "train.jsonl")
    val_manifest: str = str(data.SHAPES_DIR / "val.jsonl")
    image_root: str | None = None
    num_workers: int | None = None  # none: loader.default_workers (0 on CPU, up to 8 on CUDA)
    eval_every: int = 0  # 0: off
    best_metric: str | None = None  # none: no best checkpoint tracked
    image_decode: str = "exact"  # "draft": tests/unit/test_image_decode.py holds the rule for the default
    data_format: str = formats.AUTO
    output_dir: str = "runs/default"
    overwrite: bool = False
    epochs: int = 40
    batch_size: int | str = 16  # or "auto" (AUTO_BATCH): resolved to an int before anything uses it
    memory_budget_gib: float | None = None  # batch_size auto: none = the card's free memory
    grad_accum: int = 1
    # 6e-3 rather than 3e-3: on the tiny base both cut the val loss to ~0.32 x in 40 epochs, but
    # 6e-3 ends more accurate (0.646 vs 0.604, measured on CPU)
    lr: float = 6e-3
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 10
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    lora_r: int = 8
    lora_alpha: int | None = None  # none: 2 x lora_r (resolved on construction)
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    scope: str = "qformer"
    exclude_untrainable: bool = False
    seed: int = 0
    deterministic: bool = True
    save_every: int = 2
    keep_last: int = 2
    save_steps: int = 0  # 0: epoch checkpoints alone
    guard: str = "raise"
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    max_prompt_tokens: int = 32
    max_answer_tokens: int = 8
    stop_after_epochs: int | None = None
    progress: bool = True
    allow_unsafe: bool = False
    # On by default (issue 8's rule: an option that reaches a target and is exact). Measured on an
    # H200, full-size InstructBLIP-FlanT5-XL bf16, batch 64: 0.44x the native forward's peak
    # memory (max batch on 24 GiB 212 instead of 49) at 0.67-0.80x its samples/s
    # (reports/gpu/README.md); loss and gradients bitwise equal on transformers >= 4.35.
    lm_checkpointing: bool = True
    fused_optimizer: bool | None = False
    compile_qformer: bool = False
    compile_frozen: bool = False
    compile_mode: str = "default"  # step_options.COMPILE_MODES; "reduce-overhead": CUDA graphs
    compile_optimizer: bool = False
    feature_cache: str = "off"
    feature_cache_dir: str | None = None
    log: str = "jsonl"
    sync_every: int = 0  # 0: the step reads its results on the host every step (training/step.py)
    quantize_language_model: str = "none"

    def __post_init__(self):
        if self.lora_alpha is None:  # the same default as verify's (lora.default_alpha: 2r)
            self.lora_alpha = lora.default_alpha(self.lora_r)
        if self.sync_every > 0:
            self.check_deferred_reads()
        self.check_compile_options()

    def check_deferred_reads(self) -> None:
        """ConfigError naming the options that deferred host reads (sync_every > 0) cannot run with,
        before anything is built (step.check_deferred checks the built optimizer and process count too)."""
        why = []
        if self.guard == "rollback":
            why.append("guard 'rollback' decides on the host before every step; use guard 'skip' or 'raise'")
        if self.fused_optimizer is not True:
            why.append("a non-finite step is skipped on the device by fused AdamW; set fused_optimizer to true")
        if self.precision == "fp16-amp":
            why.append("fp16-amp's GradScaler decisions need host reads; use bf16 or fp32")
        if why:
            raise ConfigError(
                f"option 'sync_every' is {self.sync_every} (deferred host reads), refused: " + "; ".join(why)
            )

    def check_compile_options(self) -> None:
        """ConfigError naming the option for compile settings that cannot work together."""
        compiled = self.compile_qformer or self.compile_frozen or self.compile_optimizer
        # an unknown mode is load_run_config's to refuse (with the file or flag that gave it)
        if self.compile_mode in step_options.COMPILE_MODES[1:] and not compiled:
            raise ConfigError(
                f"option 'compile_mode' is {self.compile_mode!r}, but nothing is compiled: it applies to "
                "compile_qformer, compile_frozen and compile_optimizer; set one of them to true"
            )
        if not self.compile_optimizer:
            return
        if self.sync_every > 0:
            raise ConfigError(
                f"option 'compile_optimizer' is true with 'sync_every' {self.sync_every}, refused: deferred host "
                "reads skip a non-finite step on the device through fused AdamW's found_inf, which the compiled "
                "AdamW step has no input for; drop one of them"
            )
        if self.fused_optimizer is not False:
            raise ConfigError(
                f"option 'compile_optimizer' is true with 'fused_optimizer' {self.fused_optimizer}, refused: it "
                "compiles torch's default AdamW into fused kernels, and fused AdamW is one kernel already; set "
                "fused_optimizer to false"
            )


# The word --help shows for an option's value where the type alone says too little: a path, a
# directory, a name (cli_options.METAVARS spells the rest from the field's type).
VALUE_NAMES = {
    "preset": "NAME|FILE.json",
    "base_checkpoint": "DIR",  # or 'none' in train and doctor: its help says so
    "train_manifest": "PATH",
    "val_manifest": "PATH",
    "image_root": "DIR",
    "output_dir": "DIR",
    "feature_cache_dir": "DIR",
    "targets": "NAME[,NAME...]",
    "batch_size": "INT|auto",
}

# One line per option: what it does, in its units (the CLI adds the type, the accepted range and
# the default).
HELP = {
    "preset": "architecture preset (resources/configs) of a randomly initialised base model, used when "
    "--base-checkpoint is none",
    "base_checkpoint": "local directory of an InstructBLIP/BLIP-2 checkpoint to start from (default: the tiny "
    "pretrained shapes base in resources/checkpoints); 'none' builds --preset with random weights",
    "num_workers": "DataLoader worker processes that decode and process images while the step runs; the "
    "batches are the same for any count (default: none = 0 on CPU, one per free core up to 8 on CUDA)",
    "train_manifest": "training data in any --data-format: our JSONL manifest (image, instruction, answer, optional "
    "id), a LLaVA JSON, a Hugging Face dataset folder or file, a COCO captions, VQAv2 or ScienceQA file; of a "
    "source with several splits, its train split",
    "val_manifest": "validation data in any --data-format (as --train-manifest); of a source with several splits, "
    "its val/validation split",
    "image_root": "directory image paths are resolved in (default: the manifest's directory, or where the "
    "format's official layout puts its images)",
    "eval_every": "every N epochs (and at the start and the end), the task metrics of the validation data by "
    "generation, as qformer-lora evaluate computes them (exact match; VQA accuracy, multiple choice or BLEU-4 / "
    "CIDEr-D where the data holds them), logged as eval_<metric>; 0: off",
    "best_metric": "keep the checkpoint of the epoch best by this logged metric: val_loss (lower is better), "
    "val_accuracy or an eval_<metric> of --eval-every (higher is better); the epoch is saved whatever --save-every "
    "says, kept whatever --keep-last says, and logged as best_epoch; none: off",
    "image_decode": "how JPEGs are decoded: exact (in full) or draft (libjpeg scales by 1/2, 1/4 or 1/8 while "
    "decoding, keeping both sides at least the model's image size: 1.7x the images/s per core on COCO-sized "
    "photos, but the pixels differ from exact by 1.24 levels of 255 on average, more than re-saving the JPEG at "
    "quality 95 does (0.69), so not the default)",
    "data_format": "format of --train-manifest and --val-manifest; auto detects it from the path (the rules: "
    'README, "Your data")',
    "output_dir": "run directory: metrics.jsonl and checkpoints/",
    "overwrite": "start afresh in an output directory that already holds a run, deleting its log and "
    "checkpoints (without it such a directory is refused; --resume continues it instead)",
    "epochs": "passes over the training data",
    "batch_size": "samples per micro-batch (per process under torchrun); auto (train on CUDA): the largest that "
    "fits the card's memory, from two probe steps and one confirming step (README, --batch-size auto)",
    "memory_budget_gib": "with --batch-size auto: the device memory the run may use, model included, in GiB "
    "(default: none = what the card has free when the run starts)",
    "grad_accum": "micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)",
    "lr": "peak learning rate of AdamW, reached after --warmup-steps",
    "weight_decay": "AdamW weight decay",
    "adam_eps": "AdamW epsilon",
    "warmup_steps": "optimizer steps of linear warm-up, then linear decay to 0",
    "max_grad_norm": "clip the global L2 norm of the adapter gradients to this value (none: no clipping)",
    "precision": "fp32 | bf16 | fp16-amp (autocast + GradScaler) | fp16-pure (everything fp16; "
    "reproduces the seed's NaN, refused unless --allow-unsafe)",
    "lora_r": "LoRA rank r",
    "lora_alpha": "LoRA alpha (default: 2 x rank, as in Kim et al. 2024's Q-Former LoRA)",
    "lora_dropout": "dropout probability on the LoRA branch's input (0 to 1)",
    "targets": "comma-separated layer names matched inside the Q-Former",
    "scope": "where LoRA may go: the Q-Former only, or Q-Former + language model (the seed's broad scope)",
    "exclude_untrainable": "leave out the LoRA adapters that can never get a gradient (the text-branch "
    "feed-forward of InstructBLIP's last Q-Former layer; what a probe backward finds; verify lists them)",
    "seed": "seed for model init, LoRA init and data order",
    "deterministic": "use deterministic algorithms (bitwise-reproducible on CPU)",
    "save_every": "save a checkpoint every N epochs (and always after the last)",
    "keep_last": "keep only the newest K checkpoints (0 keeps all)",
    "save_steps": "also save a checkpoint every N optimizer steps, mid-epoch (checkpoints/step-<step>; 0: off)",
    "guard": "on a non-finite input, loss, gradient or parameter: raise (stop with a diagnosis) | skip (drop "
    "the batch; abort if the parameters are non-finite) | rollback (restore the last finite adapter "
    "and optimizer state, lower lr)",
    "max_rollbacks": "guard=rollback: give up (raise) after this many rollbacks",
    "rollback_lr_factor": "guard=rollback: multiply the learning rate by this after each rollback",
    "max_prompt_tokens": "truncate prompts to this many tokens (with a warning naming the sample)",
    "max_answer_tokens": "truncate answers to this many tokens (with a warning naming the sample)",
    "stop_after_epochs": "stop after this many epochs of the schedule, as if interrupted (for resume tests)",
    "progress": "show a progress bar",
    "allow_unsafe": "train even with a precision setting known to fail",
    "lm_checkpointing": "activation checkpointing of the frozen language model (default: true; under half the "
    "peak memory at batch 64 on InstructBLIP-FlanT5-XL, for one more LM forward per step; "
    "same loss and gradients); false trades that memory for 1.2-1.5x the speed",
    "fused_optimizer": "AdamW implementation: true = fused (foreach with a warning where torch has no fused kernel "
    "for the device), none = fused where available, false = torch's default",
    "compile_qformer": "torch.compile the Q-Former with static shapes (every text is padded to its token budget); "
    "falls back to eager, with the reason logged, if compiling fails",
    "compile_frozen": "torch.compile each block of the frozen vision encoder and language model (static shapes "
    "as for compile_qformer; falls back to eager, with the reason logged)",
    "compile_mode": "default | reduce-overhead: the torch.compile mode of compile_qformer, compile_frozen and "
    "compile_optimizer. reduce-overhead is torch.compile's CUDA graphs: each compiled graph of the fixed-shape step "
    "(the collator pads every text to its budget) is recorded once and replayed with one launch, removing the "
    "per-kernel launch cost that leaves the step host-bound; it costs memory (each graph keeps its own pool) and "
    "a longer first step. A host read inside the step (the loss and the finite checks read every step unless "
    "--sync-every) splits the replays, so it pairs with --sync-every. On a CPU it compiles as default (recorded). "
    "Needs one of the compile options on",
    "compile_optimizer": "torch.compile the AdamW step (torch's default AdamW, fused_optimizer false) into a few "
    "fused kernels, the learning rate passed as a tensor so the schedule does not recompile it; falls back to "
    "eager, with the reason logged, if compiling fails. Not with --sync-every (its skip needs fused AdamW)",
    "feature_cache": "off | memory | disk: compute the frozen vision encoder's features once per image and reuse "
    "them (exact; refused with image augmentation or a trainable vision encoder)",
    "feature_cache_dir": "directory of the disk feature cache (default: <output_dir>/feature_cache)",
    "sync_every": "deferred host reads: the step keeps its loss, gradient norm and finite flag on the device "
    "(no host sync inside it) and the loop reads them once every N optimizer steps, logging each step then; a "
    "non-finite step is skipped on the device by fused AdamW (exact), guard=raise raises at the read naming that "
    "step; the schedule and the step numbers count attempted steps, skipped ones too. Needs fused_optimizer true, "
    "guard skip or raise, bf16 or fp32, one process. 0: read every step (no fused AdamW needed)",
    "log": "jsonl: metrics.jsonl alone | tensorboard: also TensorBoard event files in the run directory, the "
    "step and epoch numbers as scalars (train/*, val/*, epoch/*; needs qformer-lora[tensorboard])",
    "quantize_language_model": "none | int8 (bitsandbytes LLM.int8: 1 byte per weight + a scale per row) | nf4 "
    "(4-bit NormalFloat as in QLoRA: 0.5 byte per weight + a scale per 64): quantize the frozen language model's "
    "linear layers (not lm_head, nor T5's wo) to save memory; the adapters stay fp32; the loss differs from the "
    "unquantized model's by the quantization error; needs qformer-lora[quant]",
}


class ConfigError(ValueError):
    """A run config names an unknown option or gives a value of the wrong type."""


# The smallest value each count accepts: below it a run divided by zero, trained nothing, or
# (keep_last < 0) pruned every checkpoint it wrote.
MINIMUMS = {
    "epochs": 1,
    "batch_size": 1,
    "grad_accum": 1,
    "save_every": 1,
    "keep_last": 0,
    "save_steps": 0,
    "warmup_steps": 0,
    "max_rollbacks": 0,
    "stop_after_epochs": 1,
    "num_workers": 0,
    "eval_every": 0,
    "sync_every": 0,
}


# How a value of each type is written in a TOML file or on the command line.
SPELLED = {"bool": " (true or false; also yes/no, 1/0)", "tuple[str, ...]": " (comma-separated names)"}


def coerce(name: str, value, where: str):
    """``value`` converted to the type of TrainConfig field ``name``; ConfigError naming it if impossible."""
    fields = TrainConfig.__dataclass_fields__
    if name not in fields:
        raise ConfigError(f"{where}: unknown option {name!r}; known options: {', '.join(fields)}")
    default = getattr(TrainConfig, name)
    annotation = str(fields[name].type)
    if isinstance(value, str) and value.lower() in WORDS.get(name, ()):
        return value.lower()
    if value is None or (isinstance(value, str) and value.lower() == "none" and "None" in annotation):
        if "None" in annotation:
            return None
        raise ConfigError(f"{where}: option {name!r} needs a value")
    try:
        if annotation.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
                raise TypeError
            return tuple(i.strip() for i in items if i.strip())
        if annotation.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        kind = int if annotation.startswith("int") else float if annotation.startswith("float") else str
        if kind in (int, float) and isinstance(value, bool):
            raise TypeError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        if kind is str and not isinstance(value, str):
            raise TypeError
        converted = kind(value)
    except (TypeError, ValueError):
        spelled = SPELLED.get(annotation.split(" | ")[0], "")
        if name in WORDS:  # "int or 'auto'", not the annotation's "int | str"
            annotation = " or ".join([annotation.split(" | ")[0], *map(repr, WORDS[name])])
        shown = str(default).lower() if default is None or isinstance(default, bool) else repr(default)
        raise ConfigError(
            f"{where}: option {name!r} expects {annotation}{spelled}, got {value!r} (default {shown})"
        ) from None
    if kind is float and not math.isfinite(converted):
        # float("nan") and float("inf") parse: a NaN learning rate or clip norm would train on silently
        raise ConfigError(f"{where}: option {name!r} is {value!r}; it must be a finite number")
    return converted


def load_run_config(path: str | os.PathLike | None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from a TOML file (flat keys, as the CLI flags) plus overrides."""
    from ..compat import tomllib

    values, sources = {}, {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: run config not found") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:  # a directory, unreadable, not UTF-8 text
            raise ConfigError(f"{path}: cannot read the run config: {err}") from None
        values = {k: coerce(k, v, str(path)) for k, v in raw.items()}
        sources = dict.fromkeys(raw, str(path))
    for name, value in (overrides or {}).items():
        sources[name] = f"--{name.replace('_', '-')}"
        values[name] = coerce(name, value, sources[name])
    if values.get("base_checkpoint"):
        # absolute: the checkpoints record it, and generate / export load it from wherever they run
        values["base_checkpoint"] = str(Path(values["base_checkpoint"]).resolve())
    config = TrainConfig(**values)

    def refuse(name: str, why: str):
        raise ConfigError(f"{sources.get(name, 'default')}: option {name!r} is {getattr(config, name)!r}; {why}")

    for name, allowed in (
        ("precision", precision.NAMES),
        ("guard", GUARDS),
        ("scope", tuple(lora.SCOPES)),
        ("feature_cache", step_options.FEATURE_CACHE_MODES),
        ("compile_mode", step_options.COMPILE_MODES),
        ("log", LOGS),
        ("data_format", formats.CHOICES),
        ("image_decode", IMAGE_DECODES),
        ("quantize_language_model", quantization.MODES),
    ):
        if getattr(config, name) not in allowed:
            refuse(name, f"expected one of {allowed}")
    for name, minimum in MINIMUMS.items():
        if getattr(config, name) not in (None, *WORDS.get(name, ())) and getattr(config, name) < minimum:
            refuse(name, f"it must be at least {minimum}")
    if config.best_metric is not None and config.best_metric not in best_metrics(config.eval_every):
        refuse("best_metric", f"expected one of {best_metrics(config.eval_every)}")
    return config


def best_metrics(eval_every: int) -> tuple[str, ...]:
    """The logged metrics --best-metric may name: validation's always, the task metrics with --eval-every."""
    return ("val_loss", "val_accuracy") + (tuple(f"eval_{m}" for m in tasks.METRICS) if eval_every else ())
