"""AtomicCheckpointIO: Lightning's checkpoint writer, made atomic. Apart from run_folder.py so that reading a run
folder (which checkpoint serves it, for predict, export and the app) does not import Lightning."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.plugins import TorchCheckpointIO

from detect_waste_cls.run_folder import partial_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint under a temporary name beside it and renames it into place, so a kill or a full
    disk in the middle of a write leaves the previous file whole, never a torn one under a name resume trusts."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = partial_path(path)
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)
