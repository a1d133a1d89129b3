"""`new_output_folder(out)`: every command that creates an --out folder writes it whole or not at all."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from detect_waste_cls.errors import check_new_folder


@contextmanager
def new_output_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write into, renamed to `out` when the block ends.

    Beside, so the rename is atomic: `out` appears complete or not at all. Any failure, Ctrl-C included,
    removes the temporary folder and the parent folders made for it, so a retry finds nothing in its way.
    Files written inside should name `out`, not the temporary folder.
    """
    out = check_new_folder(Path(out))
    made_parents = [folder for folder in out.parents if not folder.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir()
    try:
        yield partial
        check_new_folder(out)  # something else may have made it meanwhile
        partial.replace(out)  # onto an empty folder too: POSIX rename replaces one
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        for folder in made_parents:  # nearest first; one another program wrote into stays
            with suppress(OSError):
                folder.rmdir()
        raise
