from pathlib import Path


class UserInputError(Exception):
    """A problem with what the user gave us (paths, flags, data), reported as one line without a traceback."""


def check_new_folder(out: Path) -> Path:
    """`out` if it is missing or an empty folder: every command that writes a folder refuses to write into a
    user's files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out} already exists and is not empty; choose another --out")
    return out


def check_new_path(out: Path) -> Path:
    """`out` if nothing is there: a command that writes a file refuses to replace one."""
    if out.exists():
        raise UserInputError(f"{out} already exists; choose another --out")
    return out
