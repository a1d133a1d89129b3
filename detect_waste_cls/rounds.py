"""Teacher mode (Noisy Student, with SimCLRv2's distillation of every unlabeled image): teachers, then students.

Round 0 trains the teachers (one supervised model per --pseudo-teacher-models name, each at its
native size) unless --pseudo-teacher gives them; each student round learns from the previous
round's teachers, and its final model teaches the next round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
from lightning.pytorch.utilities import rank_zero_only

from detect_waste_cls.config import RESUME_AUTO, TrainConfig
from detect_waste_cls.data.images import resolve_images_square
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.evaluate import evaluate_ensemble
from detect_waste_cls.fit import RunResult, fit_and_test
from detect_waste_cls.pseudo.teachers import TeacherLabelCache
from detect_waste_cls.resolve import resolve_config, trains_on_gpu
from detect_waste_cls.run_folder import create_run_dir, shared_run_dir, teacher_labels_dir, write_config

log = logging.getLogger(__name__)

ROUNDS_TABLE = "rounds.csv"
ENSEMBLE = "ensemble"  # the rounds.csv line (and round-0-ensemble/ folder) of the teachers' mean prediction
SCORES = ("accuracy", "balanced_accuracy", "macro_f1")


def teacher_configs(config: TrainConfig) -> dict[str, TrainConfig]:
    """Round 0: one resolved supervised config per teacher model, keyed by its folder name (`config` as given)."""
    pseudo = config.pseudo
    names = pseudo.teacher_models or (config.model.name,)
    finetune = {"finetune": pseudo.teacher_finetune} if pseudo.teacher_finetune else {}
    configs = {}
    for name in names:
        supervised = {"mode": "none", "teacher_models": None, "teacher_finetune": None, "distill_probe": None}
        changes = {"pseudo": supervised, "optim": finetune}
        if name != config.model.name:  # another backbone: its native size (unless --img-size), its own weights
            changes["model"] = {"name": name, "weights": None}
        folder = "round-0" if len(names) == 1 else f"round-0-{name}"
        configs[folder] = resolve_config(config.replace(**changes))
    return configs


def train_rounds(config: TrainConfig, callbacks: Sequence[pl.Callback] = ()) -> RunResult:
    """`config` as given (each round resolves its own defaults: teachers of other models get their own sizes).

    Rounds live in <run>/round-<k>/, each a complete run folder with its own config.json; <run>/rounds.csv gets a
    line per finished run (with several teachers, also the line of their ensemble).

    Teacher labels are cached in <run>/teacher-labels/, or <--cache-dir>/teacher-labels/: students of the same
    teachers on the same images (other rows of a study, given one --cache-dir) read them instead of running the
    teachers again.
    """
    resolved = resolve_config(config)
    pseudo = resolved.pseudo
    if config.run.resume == RESUME_AUTO:
        raise UserInputError(f"--resume {RESUME_AUTO} continues a single run; to continue a student round, use "
                             "--pseudo-teacher <its teachers> --pseudo-rounds 1 --resume <round folder>/checkpoints/last.ckpt")
    if config.run.resume and (pseudo.teacher is None or pseudo.rounds > 1):
        raise UserInputError("--resume continues a single run: resume a student round with --pseudo-teacher "
                             "<its teachers> --pseudo-rounds 1 --resume <its last.ckpt>")
    # Every teacher resolved (its weights found) before the run folder exists: a missing one stops the run here.
    round_0 = teacher_configs(config) if pseudo.teacher is None else {}
    top = create_run_dir(config.run.out, config.model.name, num_nodes=config.run.num_nodes)
    cache = TeacherLabelCache(teacher_labels_dir(top, config.run.cache_dir))
    log.info("teacher labels are cached in %s", cache.folder)
    first_process = rank_zero_only.rank == 0  # no Trainer yet to ask; DDP's extra ranks have RANK set
    if first_process:
        write_config(top / "config.json", resolved)  # replays every round; each round's own config is in its folder
    results: list[RunResult] = []
    table: list[dict] = []
    teachers = pseudo.teacher
    with shared_run_dir(top):
        if teachers is None:
            trained = [fit_and_test(round_config, callbacks, top / folder) for folder, round_config in round_0.items()]
            results += trained
            table += [_line(result) for result in trained]
            teachers = tuple(str(result.final_checkpoint) for result in trained)
            if len(trained) > 1 and first_process:
                metrics = _score_ensemble(teachers, resolved, top / f"round-0-{ENSEMBLE}")
                table.append({"round": ENSEMBLE, "model": ENSEMBLE,
                              **{score: (metrics or {}).get(score) for score in SCORES}})
            if first_process:
                _write_table(top / ROUNDS_TABLE, table)
        for number in range(1, pseudo.rounds + 1):
            round_config = config.replace(pseudo={"teacher": teachers, "teacher_models": None, "rounds": 1})
            result = fit_and_test(resolve_config(round_config), callbacks, top / f"round-{number}", teacher_labels=cache)
            results.append(result)
            table.append(_line(result))
            teachers = (str(result.final_checkpoint),)
            if first_process:
                _write_table(top / ROUNDS_TABLE, table)
    last = results[-1]
    return RunResult(resolved, top, last.final_checkpoint, last.test_metrics, rounds=tuple(results))


def _score_ensemble(teachers: Sequence[str], config: TrainConfig, out_dir: Path) -> dict | None:
    """Test metrics of the teachers' mean prediction (rank 0): what their labels are worth on labeled images."""
    test = resolve_images_square(config.data.root) / "test"
    if not test.is_dir():
        return None
    return evaluate_ensemble(teachers, test, out_dir, batch_size=4 * config.data.batch_size,
                             num_workers=config.data.num_workers, device="cuda" if trains_on_gpu(config.run) else "cpu")


def _line(result: RunResult) -> dict:
    return {"round": result.run_dir.name, "model": result.config.model.name,
            "teacher": " ".join(result.config.pseudo.teacher or ()),
            **{score: (result.test_metrics or {}).get(score) for score in SCORES},
            "checkpoint": str(result.final_checkpoint)}


def _write_table(path: Path, lines: Sequence[dict]) -> None:
    pd.DataFrame(lines).to_csv(path, index=False)
