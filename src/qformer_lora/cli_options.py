"""The CLI's one vocabulary: value types and the options shared by subcommands.

Options that are run-config fields (rank, alpha, targets, scope, precision, the step options,
the optimizer's) are declared once here, from ``training.run_config`` (type, default, help), by
:func:`config_option`; ``--device`` by :func:`add_device_option`. Booleans take a value
(``true``/``false``); a list to sweep over has a plural name (``bench --precisions bf16 fp32``).
``tests/unit/test_cli_vocabulary.py`` walks every parser and fails on a disagreement.
"""

from __future__ import annotations

import argparse

import torch

from . import formats, lora, precision, presets, quantization, tasks
from .training import run_config, step_options

AUTO = "auto"  # --device: cuda when available, else cpu


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (a batch of 0 or a --limit of -1 ran and wrote reports, or dropped a sample)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not a positive integer")
    return number


def boolean(value: str) -> bool:
    """argparse type for a yes/no option that is no run-config field, read as run_config.coerce reads
    the booleans that are: true/false (also 1/0, yes/no)."""
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in words:
        raise argparse.ArgumentTypeError(f"{value!r} is neither true nor false")
    return words[value.lower()]


def device_name(value: str) -> str:
    """argparse type: 'auto' or a torch device this machine has ('cuda' without one failed deep inside torch)."""
    if value == AUTO:
        return value
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: {str(err).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    return value


def resolve_device(value: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if value == AUTO else value


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=device_name,
        default=AUTO,
        metavar="auto|cpu|cuda[:N]",
        help="auto (cuda when available, else cpu), cpu or cuda[:N] (default: auto)",
    )


# Fixed choices of run-config options, shown in --help and checked by the parser.
CHOICES = {
    "precision": precision.NAMES,
    "scope": tuple(lora.SCOPES),
    "guard": run_config.GUARDS,
    "feature_cache": step_options.FEATURE_CACHE_MODES,
    "log": run_config.LOGS,
    "data_format": formats.CHOICES,
    "image_decode": run_config.IMAGE_DECODES,
    "quantize_language_model": quantization.MODES,
}


# The value of a run-config option by its type, as --help shows it (argparse's own placeholder,
# the option's name in capitals, says nothing). A path or a name: run_config.VALUE_NAMES; a fixed
# set of values: CHOICES, shown as {a,b,c}. tests/unit/test_cli_vocabulary.py fails on a bare one.
METAVARS = {
    "bool": "{true,false}",
    "bool | None": "{true,false,none}",
    "int": "INT",
    "int | None": "INT|none",
    "float": "FLOAT",
    "float | None": "FLOAT|none",
    "str": "TEXT",
    "str | None": "TEXT|none",
    "tuple[str, ...]": "NAME[,NAME...]",
}


def metavar(name: str) -> str | None:
    """The --help word for run-config option ``name``'s value (None: argparse lists its choices)."""
    if name in CHOICES:
        return None
    annotation = str(run_config.TrainConfig.__dataclass_fields__[name].type)
    return run_config.VALUE_NAMES.get(name) or METAVARS[annotation]  # KeyError: a new type needs a word


def spelled(value) -> str:
    """A default as it is written on the command line: true/false/none, not Python's True/False/None;
    a path inside the installed package as resources/... (the full path depends on the install)."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and value.startswith(str(presets.RESOURCES_DIR)):
        return "resources" + value.removeprefix(str(presets.RESOURCES_DIR))
    return str(value)


def option_help(name: str) -> str:
    """Run-config option ``name``'s help: what it does (run_config.HELP), its range and its default."""
    text, minimum = run_config.HELP[name], run_config.MINIMUMS.get(name)
    default = getattr(run_config.TrainConfig, name)
    notes = [f"at least {minimum}"] if minimum is not None else []
    if "(default:" not in text:  # some say their default in words already
        notes.append(f"default: {','.join(default) if isinstance(default, tuple) else spelled(default)}")
    return f"{text} ({'; '.join(notes)})" if notes else text


def _coercer(name: str, flag: str):
    def parse(value: str):
        try:
            return run_config.coerce(name, value, flag)
        except run_config.ConfigError as err:  # argparse names the flag itself
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{flag}: ")) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def config_option(parser: argparse.ArgumentParser, name: str, *, overrides: bool = False) -> None:
    """``--<name>`` for run-config field ``name``: its type, default and help. ``overrides``: the
    parser default is None so a TOML run config can supply the value (train); the help shows the
    field's default either way."""
    flag = f"--{name.replace('_', '-')}"
    parser.add_argument(
        flag,
        dest=name,
        type=_coercer(name, flag),
        choices=CHOICES.get(name),
        default=None if overrides else getattr(run_config.TrainConfig, name),
        metavar=metavar(name),
        help=option_help(name),
    )


def lora_spec(args) -> lora.LoraSpec:
    return lora.LoraSpec(
        r=args.lora_r,
        alpha=args.lora_alpha,  # None: LoraSpec applies lora.default_alpha
        dropout=args.lora_dropout,
        targets=tuple(args.targets),
        scope=args.scope,
        exclude_untrainable=args.exclude_untrainable,
    )


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The data of generate and evaluate: a path in any format, default the run's validation data."""
    parser.add_argument(
        "--manifest",
        metavar="PATH",
        help="data in any --data-format: answer every sample (up to --limit; default: the run's validation data)",
    )
    parser.add_argument(
        "--data-format",
        choices=formats.CHOICES,
        default=formats.AUTO,
        help="format of --manifest; auto detects it from the path, or takes the run's for its validation data "
        "(default: auto)",
    )
    parser.add_argument(
        "--image-root", default=None, metavar="DIR", help="image root for --manifest (default: its directory)"
    )


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Decoding options of generate and evaluate (tasks.GenerationOptions)."""
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        metavar="TOKENS",
        help="longest answer in tokens (default: none = the run's --max-answer-tokens)",
    )
    parser.add_argument(
        "--num-beams", type=positive_int, default=1, metavar="INT", help="beam search width; 1 is greedy (default: 1)"
    )
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        metavar="FLOAT",
        help="beam search: exponent on the answer length dividing a beam's log-likelihood; > 1 favours longer "
        "answers (default: 1.0)",
    )
    config_option(parser, "batch_size")


def generation_options(args):
    if args.batch_size == run_config.AUTO_BATCH:  # the word train's flag also takes
        raise run_config.ConfigError("--batch-size auto sizes training batches only; give a number here")
    return tasks.GenerationOptions(args.max_new_tokens, args.num_beams, args.length_penalty, args.batch_size)
