"""Every command writes its outputs whole or not at all: `new_output_folder(out)` for an --out folder,
`new_output_files(paths)` for several files (or folders) side by side, such as predict --boxes' JSON and CSV."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from detect_waste_cls.errors import check_new_folder, check_new_path


@contextmanager
def _partial_folder(out: Path) -> Iterator[Path]:
    """A new temporary folder beside `out`, its parents made as needed. Any failure, Ctrl-C included, removes it
    and the parent folders made for it, so a retry finds nothing in its way."""
    made_parents = [folder for folder in out.parents if not folder.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for folder in made_parents:  # nearest first; one another program wrote into stays
            with suppress(OSError):
                folder.rmdir()
        raise


@contextmanager
def new_output_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write into, renamed to `out` when the block ends.

    Beside, so the rename is atomic: `out` appears complete or not at all. Files written inside should name
    `out`, not the temporary folder.
    """
    out = check_new_folder(Path(out))
    with _partial_folder(out) as partial:
        yield partial
        check_new_folder(out)  # something else may have made it meanwhile
        partial.replace(out)  # onto an empty folder too: POSIX rename replaces one


@contextmanager
def new_output_files(paths: Sequence[str | Path]) -> Iterator[Path]:
    """A temporary folder beside `paths` (new paths in one folder), in which to write each under its own name;
    when the block ends they are renamed into place together.

    The work happens before any of them appears, and the renames cannot half succeed: should one fail (another
    program made that path meanwhile), those already moved are taken back, so either every path appears or none.
    """
    paths = [check_new_path(Path(path)) for path in paths]
    if len({path.parent for path in paths}) != 1:
        raise ValueError(f"{paths}: outputs written together must share a folder")
    with _partial_folder(paths[0]) as partial:
        yield partial
        moved = []
        try:
            for path in paths:
                (partial / path.name).replace(check_new_path(path))
                moved.append(path)
        except BaseException:
            for path in moved:
                path.replace(partial / path.name)
            raise
        partial.rmdir()
