"""docs/flags.md, written from the train command's parser, whose config flags come from the config's fields:
`python -m detect_waste_cls.flags_doc > docs/flags.md` (tests/test_config_values.py fails when the file is stale)."""

import argparse
import dataclasses

from detect_waste_cls.cli import add_training_arguments
from detect_waste_cls.config import DEFAULT_MODEL, TrainConfig, field_doc

HEADER = """# Flags

(back to the [README](../README.md))

Every flag of `train_effnet.py`, `train_resnet.py` and `detect-waste-cls train|test`. A config file
(`--config FILE.yaml`, or a run's `config.json`) sets the same fields by section and name, e.g.
`optim: {epochs: 12}`; flags override it. This page is generated from the fields' help texts in
`detect_waste_cls/config.py` by `python -m detect_waste_cls.flags_doc > docs/flags.md`: edit those, not this file.
"""
COLUMNS = ("flag", "config field", "default", "allowed", "meaning")


def flags_markdown() -> str:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, DEFAULT_MODEL, "train")
    fields = {f"{name}.{item.name}": (item, getattr(section, item.name))
              for name, section in TrainConfig().sections().items() for item in dataclasses.fields(section)}
    lines = [HEADER]
    for group in parser._action_groups:  # argparse keeps its groups private; the --help sections, in order
        actions = [action for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
        if actions:
            lines += [f"## {group.title}", "", _row(COLUMNS), _row(("---",) * len(COLUMNS))]
            lines += [_row(_cells(action, *fields.get(action.dest, (None, None)))) for action in actions]
            lines.append("")
    return "\n".join(lines)


def _cells(action: argparse.Action, item: dataclasses.Field | None, default) -> tuple[str, ...]:
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
    if item is None:  # a flag of the command, not of the config
        meaning, shown, allowed, field_name = action.help or "", action.default, None, ""
    else:
        (meaning, shown), allowed, field_name = field_doc(item, default), item.metadata["allowed"], f"`{action.dest}`"
    allowed = ", ".join(map(str, action.choices)) if action.choices else str(allowed or "")
    return flags, field_name, "" if shown is None else _escape(str(shown)), allowed, _escape(meaning)


def _escape(text: str) -> str:
    """Markdown would take <model> for an HTML tag and | for a cell border."""
    return text.replace("<", "\\<").replace("|", "\\|")


def _row(cells) -> str:
    return f"| {' | '.join(cells)} |"


if __name__ == "__main__":
    print(flags_markdown(), end="")
