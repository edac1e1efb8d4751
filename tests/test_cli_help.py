"""Every ``galpipe`` command explains itself: help on every option, defaults shown, examples.

The test walks the parser that :func:`galpipe.cli.main` uses (every subcommand found
through argparse's own subparsers action, so a new command is covered without editing
this file) and renders each command's ``--help`` text.
"""

from __future__ import annotations

import argparse
import re

import pytest

from galpipe.cli import build_parser, main

#: Commands that parse their own options (``galpipe fake-skyserver`` hands its argv to
#: :func:`galpipe.testing.fakeserver.main`); their stub here has no options to check.
OWN_PARSERS = {"fake-skyserver"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


COMMANDS = sorted(set(_subparsers()) - OWN_PARSERS)


def test_every_command_is_listed_with_a_summary() -> None:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {a.dest: a.help for a in action._choices_actions}
    assert set(summaries) == set(_subparsers())
    assert all(text and text.strip() for text in summaries.values()), summaries
    assert {"predict", "evaluate", "train", "cutouts", "validate-config"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    sp = _subparsers()[name]
    text = sp.format_help()
    flat = " ".join(text.split())  # argparse wraps lines
    for action in sp._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"galpipe {name} {label}: no help text"
        takes_value = action.nargs != 0
        if action.option_strings and takes_value and action.default is not None:
            shown = f"(default: {action.default})"
            assert shown in flat, f"galpipe {name} {label}: default {action.default!r} not shown in --help"
        if action.option_strings and takes_value and action.default is None and not action.required:
            # leaving it out means something: the help must say what (a default, or what it goes with)
            help_text = " ".join((action.help or "").split())
            assert any(w in help_text for w in ("default:", "needs", "needed", "or --", "for --")), (
                f"galpipe {name} {label}: optional with no default, the help does not say what happens "
                "without it")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_ends_with_examples(name: str) -> None:
    sp = _subparsers()[name]
    text = sp.format_help()
    assert "\nExamples:\n" in text, f"galpipe {name}: no Examples epilog"
    examples = text.split("\nExamples:\n", 1)[1].rstrip().splitlines()
    assert 1 <= len(examples) <= 3
    for line in examples:  # kept as written (not re-wrapped), each a galpipe command line of this command
        assert line.startswith(f"  galpipe {name}"), line
        # every option an example uses exists
        for opt in re.findall(r"(?<=\s)(--[a-z][a-z0-9-]*)", line):
            assert opt in sp._option_string_actions, f"galpipe {name}: example uses unknown option {opt}"


def test_examples_parse(capsys: pytest.CaptureFixture[str]) -> None:
    """Each example is a command line argparse accepts (the files need not exist)."""
    parser = build_parser()
    for name in COMMANDS:
        text = _subparsers()[name].format_help()
        for line in text.split("\nExamples:\n", 1)[1].strip().splitlines():
            argv = line.split("#")[0].split()[1:]
            args = parser.parse_args(argv)
            assert args.command == name


def test_top_level_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--force" in out and "(default: predictions.csv)" in " ".join(out.split())
    assert "Examples:" in out
    text = build_parser().format_help()
    assert "Examples:" in text and "--debug" in text


def test_fake_skyserver_options_have_help_defaults_and_examples() -> None:
    from galpipe.testing.fakeserver import build_parser as fake_parser

    sp = fake_parser()
    flat = " ".join(sp.format_help().split())
    for action in sp._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), action.option_strings
        assert f"(default: {action.default})" in flat, action.option_strings
    assert "Examples:" in sp.format_help()
