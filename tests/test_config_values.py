"""Every value is checked once, where the config is built; a recipe is one flag; the help and docs/flags.md come
from the config's fields and point to files that exist."""

import argparse
import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT, train_args
from detect_waste_cls.cli import build_parser, config_from_args, main
from detect_waste_cls.config import DEFAULT_MODEL, TrainConfig, field_type, flag_name, read_config_file
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.flags_doc import flags_markdown
from detect_waste_cls.resolve import resolve_config
from detect_waste_cls.run_folder import write_config

NUMERIC_FIELDS = [(section, item) for section in map(type, TrainConfig().sections().values())
                  for item in dataclasses.fields(section) if field_type(section, item.name) in (int, float)]
# The README's recommended student before --recipe distill stood for it.
README_DISTILL_FLAGS = (
    "--pseudo teacher --pseudo-teacher-models efficientnet-lite0 efficientnet-lite1 efficientnet-lite2 "
    "--pseudo-teacher-finetune linear --pseudo-targets soft --pseudo-threshold 0 --pseudo-ratio 1 "
    "--pseudo-distill-probe --epoch-repeats 4 --epochs 12 --ema-decay 0").split()


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "-1", "--epochs -1: must be >= 1"),
    ("--val-split", "1.5", "--val-split 1.5: must be in [0, 1)"),
])
def test_a_bad_value_on_the_command_line_stops_before_any_data_or_folder(tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    # The data folder does not exist: an error about it would mean the data was looked at first.
    assert main(train_args(tmp_path / "no-data", out, flag, value)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_value_in_a_yaml_config_names_the_file_and_the_flag(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("pseudo:\n  ratio: 0\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path / "no-data")]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "c.yaml") in error and "--pseudo-ratio 0.0: must be > 0" in error


@pytest.mark.parametrize("changes, flag", [
    ({"optim": {"epochs": 0}}, "--epochs"),
    ({"data": {"batch_size": 0}}, "--batch-size"),
    ({"data": {"image_size": -5}}, "--img-size"),
    ({"optim": {"lr": -1}}, "--lr"),
    ({"pseudo": {"threshold": 2.0}}, "--pseudo-threshold"),
    ({"optim": {"epochs": "3"}}, "--epochs"),
    ({"run": {"num_nodes": 0}}, "--num-nodes"),
])
def test_a_config_built_in_python_is_held_to_the_same_ranges(changes, flag):
    with pytest.raises(UserInputError, match=f"^{flag} "):
        TrainConfig().replace(**changes)


def test_every_numeric_field_declares_its_range():
    assert [f"{section.__name__}.{item.name}" for section, item in NUMERIC_FIELDS if item.metadata["allowed"] is None] == []


def _outside(allowed, whole: bool) -> st.SearchStrategy:
    """Values a field with this range must refuse: numbers beyond a bound, and what is not a (whole) number."""
    number = st.integers if whole else (lambda **bounds: st.floats(allow_nan=False, **bounds))
    beyond = [st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.text(), st.booleans()]
    if whole:
        beyond.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
    if allowed.low is not None:
        low = {"max_value": allowed.low, "exclude_max": not allowed.low_open} if not whole else \
            {"max_value": allowed.low - (0 if allowed.low_open else 1)}
        beyond.append(number(**low))
    if allowed.high is not None:
        high = {"min_value": allowed.high, "exclude_min": not allowed.high_open} if not whole else \
            {"min_value": allowed.high + (0 if allowed.high_open else 1)}
        beyond.append(number(**high))
    return st.one_of(beyond)


@pytest.mark.parametrize("section, item", NUMERIC_FIELDS, ids=[f"{s.__name__}.{i.name}" for s, i in NUMERIC_FIELDS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_numeric_field_refuses_what_is_outside_its_range_and_accepts_its_bounds(section, item, data):
    allowed, whole = item.metadata["allowed"], field_type(section, item.name) is int
    value = data.draw(_outside(allowed, whole), label="outside")
    with pytest.raises(UserInputError, match=f"^{re.escape(flag_name(item))} .*: must be .*{re.escape(str(allowed))}"):
        section(**{item.name: value})
    for bound, is_open in ((allowed.low, allowed.low_open), (allowed.high, allowed.high_open)):
        if bound is None:
            continue
        value = int(bound) if whole else float(bound)
        if is_open:
            with pytest.raises(UserInputError):
                section(**{item.name: value})
        else:
            assert getattr(section(**{item.name: value}), item.name) == value


def parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", "--data", "DATA", *argv]), DEFAULT_MODEL)


def test_the_distill_recipe_is_the_readmes_long_command_field_by_field():
    recipe, long = parse("--recipe", "distill").to_dict(), parse(*README_DISTILL_FLAGS).to_dict()
    assert recipe["run"].pop("recipe") == "distill" and long["run"].pop("recipe") is None
    assert recipe == long
    # From Python, the same.
    python = TrainConfig.from_dict({"run": {"recipe": "distill"}, "data": {"root": "DATA"}})
    assert python == parse("--recipe", "distill") == TrainConfig().replace(data={"root": "DATA"}, run={"recipe": "distill"})


def test_flags_and_config_files_override_a_recipe(tmp_path):
    assert parse("--recipe", "distill", "--pseudo-ratio", "3").pseudo.ratio == 3
    (tmp_path / "c.yaml").write_text("run:\n  recipe: distill\npseudo:\n  threshold: 0.5\n")
    config = parse("--config", str(tmp_path / "c.yaml"), "--epochs", "5")
    assert (config.pseudo.threshold, config.optim.epochs) == (0.5, 5)
    assert (config.pseudo.targets, config.pseudo.ratio, config.data.epoch_repeats) == ("soft", 1.0, 4.0)  # the recipe's
    (tmp_path / "ratio.yaml").write_text("pseudo:\n  ratio: 2\n")
    assert parse("--config", str(tmp_path / "ratio.yaml"), "--recipe", "distill").pseudo.ratio == 2


def test_a_recipe_runs_config_json_replays_it_exactly(tmp_path):
    resolved = resolve_config(parse("--recipe", "distill", "--pseudo-ratio", "2"))
    write_config(tmp_path / "config.json", resolved)
    replayed = parse("--config", str(tmp_path / "config.json"))
    assert replayed == resolved and resolve_config(replayed) == resolved
    assert TrainConfig.from_dict(read_config_file(tmp_path / "config.json")) == resolved


def help_texts(parser: argparse.ArgumentParser):
    """Every help string of a parser and its subcommands, unwrapped (argparse wraps lines at hyphens)."""
    for action in parser._actions:
        yield action.help or ""
        if isinstance(action, argparse._SubParsersAction):
            yield from (choice.help or "" for choice in action._choices_actions)
            for subparser in action.choices.values():
                yield from help_texts(subparser)


def test_every_file_and_section_a_help_text_points_to_exists():
    pointers = re.findall(r"((?:docs|benchmarks|experiments)/[\w./-]*\w|README(?:\.md)?)(?:: ([A-Z][\w -]*\w))?",
                          "\n".join(help_texts(build_parser())))
    assert pointers
    for path, section in pointers:
        target = REPO_ROOT / ("README.md" if path == "README" else path)
        assert target.exists(), path
        if section:
            assert re.search(rf"^#+ {re.escape(section)}$", target.read_text(), re.MULTILINE), f"{path}: {section}"


def test_docs_flags_md_is_generated_from_the_config_and_lists_every_flag():
    text = (REPO_ROOT / "docs" / "flags.md").read_text()
    assert text == flags_markdown(), "docs/flags.md is stale: python -m detect_waste_cls.flags_doc > docs/flags.md"
    for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions:
        for flag in action.option_strings:
            assert f"`{flag}`" in text or flag in ("-h", "--help"), flag


@pytest.mark.parametrize("argv, message", [
    (["predict", "--checkpoint", "m", "--images", "i", "--out", "o.csv", "-b", "0"], "-b/--batch-size: 0: must be >= 1"),
    (["select", "--model", "m", "--data", "d", "--out", "o", "--budget", "0"], "--budget: 0: must be >= 1"),
    (["select", "--model", "m", "--data", "d", "--out", "o", "--budget", "5", "--review-per-class", "-1"],
     "--review-per-class: -1: must be >= 0"),
    (["app", "--model", "m", "--port", "70000"], "--port: 70000: must be in [1, 65535]"),
    (["prepare", "split", "--src", "s", "--dst", "d", "--size", "0"], "--size: 0: must be >= 1"),
    (["prepare", "crop", "--annotations", "a.json", "--images", "i", "--dst", "d", "--zoom", "-1"],
     "--zoom: -1: must be > 0"),
])
def test_a_bad_number_for_a_command_outside_the_config_is_refused_naming_the_flag(argv, message, capsys):
    """The commands' own numbers (not TrainConfig fields) are checked by the parser, before any file is read."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
