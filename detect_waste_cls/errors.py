from pathlib import Path


class UserInputError(Exception):
    """A problem with what the user gave us (paths, flags, data), reported as one line without a traceback."""


def check_new_folder(out: Path) -> Path:
    """`out` if it is missing or an empty folder: every command that writes a folder refuses to write into a
    user's files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out} already exists and is not empty; choose another --out")
    return out
