"""One CLI vocabulary: walk every subcommand's parser and fail on a disagreement.

An option that appears in two subcommands must have the same flag, the same value style
(choices, number of values, a value rather than a bare switch) and the same default. Train's
flags default to None so a TOML run config can supply values; their effective default is the
run config's. Two options differ by purpose, named below with the reason.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import pytest

from qformer_lora import cli, cli_options
from qformer_lora.training.run_config import TrainConfig

# dest -> why its default may differ between subcommands
DIFFERENT_DEFAULTS = {
    "preset": "verify and bench default to the full-size model their figures are about; train and doctor to the "
    "tiny model the embedded default run trains",
    "out": "each subcommand writes its own kind of report (reproduce: reports/, bench: reports/gpu)",
    "base_checkpoint": "train and doctor start from the tiny pretrained base; evaluate scores the run it is given "
    "unless --base-checkpoint names a base; reproduce runs its items on the embedded tiny presets unless "
    "--base-checkpoint names the user's checkpoint; generate has no base of its own (--adapter's is the one its "
    "adapter_config.json records, and alone it names the model to answer with)",
    "limit": "generate prints a few answers to read; evaluate scores the whole set",
}
# Options whose None default means "the run's value, else the TrainConfig default" (a run config or a
# run's saved config can supply it): their effective default is TrainConfig's.
RUN_CONFIG_DEFAULTS = {
    "train": set(TrainConfig.__dataclass_fields__),
    "evaluate": {"max_prompt_tokens", "max_answer_tokens"},
}
SWITCHES = {"json"}  # output switches; every option that sets a value takes one (true/false)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options() -> dict[str, dict[str, argparse.Action]]:
    return {
        name: {a.dest: a for a in p._actions if a.option_strings and a.dest != "help"}
        for name, p in subcommands().items()
    }


def effective_default(command: str, action: argparse.Action):
    if action.dest in RUN_CONFIG_DEFAULTS.get(command, ()):
        return getattr(TrainConfig, action.dest)  # the class default: lora_alpha None means 2 x rank
    return action.default


def shared() -> dict[str, dict[str, argparse.Action]]:
    by_dest = defaultdict(dict)
    for command, actions in options().items():
        for dest, action in actions.items():
            by_dest[dest][command] = action
    return {dest: found for dest, found in by_dest.items() if len(found) > 1}


def test_the_walk_sees_the_shared_vocabulary():
    # rank, alpha, targets, scope, precision, device, checkpointing: each in more than one subcommand
    assert {"lora_r", "lora_alpha", "targets", "scope", "precision", "device", "lm_checkpointing"} <= set(shared())
    assert set(subcommands()) == {
        "verify",
        "doctor",
        "train",
        "report",
        "generate",
        "evaluate",
        "export",
        "bench",
        "reproduce",
    }


@pytest.mark.parametrize("dest", sorted(shared()))
def test_a_shared_option_is_spelled_and_valued_alike(dest):
    found = shared()[dest]
    seen = {
        command: (tuple(a.option_strings), tuple(a.choices or ()), a.nargs, a.metavar, type(a).__name__)
        for command, a in found.items()
    }
    assert len(set(seen.values())) == 1, f"{dest}: flag, choices, nargs or kind differ: {seen}"
    if dest not in DIFFERENT_DEFAULTS:
        defaults = {command: effective_default(command, a) for command, a in found.items()}
        assert len({repr(v) for v in defaults.values()}) == 1, f"{dest}: defaults differ: {defaults}"


def test_a_flag_names_one_option_everywhere():
    dests = defaultdict(set)
    for actions in options().values():
        for dest, action in actions.items():
            for flag in action.option_strings:
                dests[flag].add(dest)
    assert {flag: d for flag, d in dests.items() if len(d) > 1} == {}


def test_options_that_set_a_value_take_one():
    # bench's --lm-checkpointing was a bare switch while train's took true/false
    bare = [
        f"{command} {a.option_strings[0]}"
        for command, actions in options().items()
        for a in actions.values()
        if a.nargs == 0 and a.dest not in SWITCHES
    ]
    assert bare == []


def test_flags_parse_to_the_same_values_in_every_subcommand():
    # the parse itself, not only the declarations: rank, alpha, targets, scope and booleans
    verify = cli.build_parser().parse_args(
        ["verify", "--lora-r", "4", "--targets", "query,value", "--scope", "qformer+llm"]
    )
    train = cli.build_parser().parse_args(
        ["train", "--lora-r", "4", "--targets", "query,value", "--scope", "qformer+llm", "--lm-checkpointing", "false"]
    )
    bench = cli.build_parser().parse_args(["bench", "--lm-checkpointing", "false"])
    assert (
        (verify.lora_r, verify.targets, verify.scope)
        == (train.lora_r, train.targets, train.scope)
        == (4, ("query", "value"), "qformer+llm")
    )
    assert train.lm_checkpointing is bench.lm_checkpointing is False
    assert (
        cli_options.lora_spec(verify).alpha == TrainConfig(lora_r=4).lora_alpha == 8
    )  # alpha defaults to 2r everywhere


def test_a_bad_value_names_its_flag(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--lm-checkpointing", "maybe"])
    err = capsys.readouterr().err
    # the flag named once, the values spelled as typed (it said "--lm-checkpointing" twice and "bool")
    assert err.count("--lm-checkpointing") == 2 and "true or false" in err, err  # usage line + error line


def test_help_spells_defaults_and_values_as_typed():
    train_help = subcommands()["train"].format_help()
    assert "--lm-checkpointing {true,false}" in train_help and "(default: True)" not in train_help
    assert "(default: None)" not in train_help and "(default: none)" in train_help


def value_word(action: argparse.Action) -> str:
    """What --help shows for an option's value: its metavar, else its choices, else argparse's
    placeholder (the dest in capitals)."""
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def valued() -> list[tuple[str, argparse.Action]]:
    """Every option of every subcommand that takes a value (not -h, not the output switches)."""
    return [
        (command, action)
        for command, actions in options().items()
        for action in actions.values()
        if action.nargs != 0 and action.dest not in SWITCHES
    ]


def test_no_flag_shows_a_bare_placeholder():
    # train --help showed VALUE (or NUM_WORKERS, LR, ...) for 39 of its 41 options: a name, not a type
    bare = [
        f"{command} {action.option_strings[0]} {value_word(action)}"
        for command, action in valued()
        if value_word(action) in {"VALUE", action.dest.upper(), action.option_strings[0].lstrip("-").upper()}
    ]
    assert len(valued()) > 60 and bare == []


def test_every_flag_says_its_default():
    silent = [f"{command} {a.option_strings[0]}" for command, a in valued() if "default:" not in (a.help or "")]
    assert silent == []


def test_train_help_gives_types_ranges_units_and_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width, even inside a word
    text = " ".join(subcommands()["train"].format_help().split())
    for shown in (
        "--lr FLOAT peak learning rate of AdamW, reached after --warmup-steps (default: 0.006)",
        "--epochs INT passes over the training data (at least 1; default: 40)",
        "--max-grad-norm FLOAT|none",
        "--num-workers INT|none",
        "--targets NAME[,NAME...]",
        "--output-dir DIR",
        "--max-prompt-tokens INT truncate prompts to this many tokens",
        "--device auto|cpu|cuda[:N]",
        # a path inside the installed package is shown relative to it, not as this machine's path
        "(default: resources/data/shapes/train.jsonl)",
    ):
        assert shown in text, shown
    # every run-config field's word comes from its type or VALUE_NAMES: a new type must be given one
    for name in TrainConfig.__dataclass_fields__:
        assert name in cli_options.CHOICES or cli_options.metavar(name), name
