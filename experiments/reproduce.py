"""Train and test every row of a results table, then write table.md and table.csv.

    python -m experiments.reproduce --data TREE [--table paper] [--profile smoke|full] [--only ROW ...] [--force]

Each row is a partial config file in experiments/configs/<table>/ ({section: {field: value}}, the
keys of TrainConfig and of every run's config.json); profiles.json there adds each profile's
config (tiny CPU runs, or the real recipe), its seeds, optionally a baseline row that every
other row is compared with seed by seed, and optionally substitute_models ({row model: model to
train instead}). Every row is checked against TrainConfig before the
first run starts. Rows already done are skipped, and a run that was interrupted after a completed
epoch continues from it (`--resume auto`, in its own folder), so a killed study loses at most an
epoch; teacher-mode rows, and runs killed before their first checkpoint, start over. A run folder whose
config.json an earlier version wrote and this one cannot replay is stale: it is kept aside and its row runs again.
Every row caches teacher labels in <results>/runs/teacher-labels/ (`--cache-dir`), so the students of one
seed's teachers label the pseudolabel split once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from detect_waste_cls.config import RESUME_AUTO, TrainConfig, merge, read_config_file
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.run_folder import newest_complete_checkpoint

CONFIGS = Path(__file__).resolve().parent / "configs"
DONE_MARKER = "runner.json"


def load_rows(table: str, only: list[str] | None) -> dict[str, dict]:
    folder = CONFIGS / table
    try:
        rows = {p.stem: read_config_file(p) for p in sorted(folder.glob("*.json")) if p.name != "profiles.json"}
    except UserInputError as error:
        sys.exit(f"error: {error}")
    unknown = sorted(set(only or []) - set(rows))
    if unknown:
        sys.exit(f"error: unknown row(s) {', '.join(unknown)}; rows of {table}: {', '.join(rows)}")
    return {name: row for name, row in rows.items() if not only or name in only}


def row_configs(rows: dict[str, dict], profile: dict, where: str) -> dict[str, dict]:
    """Each row's full config: the profile's, then the row's own values, then the profile's model substitutes.

    Every row is checked against TrainConfig here, before the first (long) run starts.
    """
    configs = {}
    for name, row in rows.items():
        config = merge(profile["config"], row)
        substitute = profile.get("substitute_models", {}).get(config.get("model", {}).get("name"))
        if substitute:  # e.g. a CPU profile that keeps the table's rows with models that fit the machine
            config = merge(config, {"model": {"name": substitute}})
        try:
            TrainConfig.from_dict(config, f"row {name} with {where}")
        except UserInputError as error:
            sys.exit(f"error: {error}")
        configs[name] = config
    return configs


def set_aside(folder: Path, reason: str) -> Path:
    """Keep an earlier attempt under a new name instead of deleting it; returns that name."""
    n = 1
    while folder.with_name(f"{folder.name}.{reason}-{n}").exists():
        n += 1
    return folder.rename(folder.with_name(f"{folder.name}.{reason}-{n}"))


def saved_config_problem(run: Path) -> str | None:
    """Why a run folder's config.json (or a teacher-mode round's) can no longer be replayed, or None when it can."""
    for path in [*run.glob("config.json"), *sorted(run.glob("round-*/config.json"))]:
        try:
            TrainConfig.from_dict(read_config_file(path), str(path))
        except UserInputError as error:
            return str(error)
    return None


SKIP, CONTINUE, RUN = "done, skipped", "continuing from its last completed epoch", "running"


@dataclass(frozen=True)
class Plan:
    step: str  # SKIP, CONTINUE or RUN
    set_aside_as: str | None = None  # what was in the run folder is first kept under this reason
    stale: str | None = None  # why the saved config no longer replays, for a stale run that is run again


def plan_run(out: Path, force: bool) -> Plan:
    """What to do with a row's run folder: skip it (done), continue it from its newest complete checkpoint
    (--resume auto; teacher-mode rows keep theirs in round-<k>/ and start over), or run it. A folder whose saved
    config no longer replays (written by an earlier version) is stale: it runs again, whatever its state."""
    if not out.exists():
        return Plan(RUN)
    stale = saved_config_problem(out)
    if stale is not None:
        return Plan(RUN, "stale", stale)
    done = (out / DONE_MARKER).is_file()
    if force:
        return Plan(RUN, "replaced" if done else "interrupted")
    if done:
        return Plan(SKIP)
    if newest_complete_checkpoint(out) is not None:
        return Plan(CONTINUE)
    return Plan(RUN, "interrupted")


def run_row(command: list[str], out: Path, log_file: Path, row: str, seed: int, continued: bool) -> float:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_file.open("a" if continued else "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        hint = " (it continued an interrupted run: --force starts it over)" if continued else ""
        sys.exit(f"error: {out.name} failed (exit {result.returncode}); see {log_file}{hint}")
    # A continued run's wall time covers only its last part: the killed part went unmeasured.
    marker = {"row": row, "seed": seed, "command": command, "wall_time_s": wall, "continued": continued}
    (out / DONE_MARKER).write_text(json.dumps(marker, indent=2))
    return wall


def last_logged(metrics_csv: Path, column: str) -> float | None:
    if not metrics_csv.is_file():  # a scored ensemble logs nothing
        return None
    log = pd.read_csv(metrics_csv)
    return float(log[column].dropna().iloc[-1]) if column in log and log[column].notna().any() else None


def finished_runs(results: Path) -> list[Path]:
    """Run folders with a done marker, leaving out earlier attempts that were set aside, and stale runs (said so)."""
    runs = []
    for marker in sorted(results.glob(f"runs/*/{DONE_MARKER}")):
        info = json.loads(marker.read_text())
        if marker.parent.name != f"{info['row']}-seed{info['seed']}":
            continue
        stale = saved_config_problem(marker.parent)
        if stale is not None:
            print(f"{marker.parent.name}: left out of the table, stale: {stale}; run its row again to bring it back")
            continue
        runs.append(marker.parent)
    return runs


def summarize_run(run: Path) -> list[dict]:
    """One table row per run, or per round of a teacher-mode run (named <row>/round-<k>)."""
    done = json.loads((run / DONE_MARKER).read_text())
    rounds = sorted(run.glob("round-*/metrics.json"), key=lambda path: int(path.parent.name.split("-")[1]))
    if not rounds:
        return [summarize_folder(run, done["row"], done)]
    return [summarize_folder(path.parent, f"{done['row']}/{path.parent.name}", done) for path in rounds]


def summarize_folder(run: Path, row: str, done: dict) -> dict:
    # A teachers' ensemble (round-0-ensemble/) is scored, not trained: it has no config of its own.
    own_config = run / "config.json" if (run / "config.json").is_file() else run.parent / "config.json"
    config = TrainConfig.from_dict(read_config_file(own_config), str(own_config))
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "row": row,
        "model": config.model.name if own_config.parent == run else "ensemble",
        "start": "ImageNet" if config.model.pretrained else "scratch",
        "fine-tuning": config.optim.finetune,
        "classes": len(metrics["classes"]),
        "ACC": metrics["accuracy"],
        "balanced ACC": metrics["balanced_accuracy"],
        "macro-F1": metrics["macro_f1"],
        "pseudo-label ACC": last_logged(run / "metrics.csv", "pseudo/accuracy"),
        "confident pseudo-label ACC": last_logged(run / "metrics.csv", "pseudo/confident_accuracy"),
        "sampler": "weighted" if config.data.weighted_sampler else "random",
        "pseudolabeling": config.pseudo.mode,
        "epochs": config.optim.epochs,
        "image size": config.data.image_size,
        "seed": config.run.seed,
        # Of the whole run (every round of a teacher-mode run); unknown for a run continued after a kill.
        "wall time (s)": None if done.get("continued") else done["wall_time_s"],
    }


def paired_differences(table: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each row minus the baseline row trained with the same seed, as mean ± std over the shared seeds.

    Runs with one seed start from the same weights and data order (a pseudo-labeling run even
    trains identically until --pseudo-start), so per-seed differences are far less noisy than
    comparing means.
    """
    metrics = ["ACC", "balanced ACC", "macro-F1"]
    reference = table[table.row == baseline].set_index("seed")[metrics]
    paired = table[table.row != baseline].merge(reference, left_on="seed", right_index=True, suffixes=("", " baseline"))
    differences = pd.DataFrame({"row": paired.row})
    for metric in metrics:
        differences[f"Δ {metric}"] = paired[metric] - paired[f"{metric} baseline"]
    grouped = differences.groupby("row")
    summary = grouped.mean().map("{:+.4f}".format) + grouped.std().map(lambda s: "" if pd.isna(s) else f" ± {s:.4f}")
    summary["ACC better on"] = grouped["Δ ACC"].agg(lambda d: f"{int((d > 0).sum())} of {len(d)} seeds")
    return summary.reset_index()


def write_tables(results: Path, runs: list[dict], baseline: str | None = None) -> pd.DataFrame:
    table = pd.DataFrame(runs).sort_values(["row", "seed"])
    table.to_csv(results / "table.csv", index=False)
    metric_columns = ["ACC", "balanced ACC", "macro-F1", "pseudo-label ACC", "confident pseudo-label ACC"]
    text = "# Results\n\n" + table.to_markdown(index=False, floatfmt=".4f") + "\n"
    if table.seed.nunique() > 1:
        grouped = table.groupby(["row", "model", "start", "fine-tuning", "sampler", "pseudolabeling"])[metric_columns]
        spread = grouped.std().round(4).map(lambda std: "" if pd.isna(std) else f" ± {std}")  # one seed: no std
        summary = grouped.mean().round(4).map(lambda mean: "" if pd.isna(mean) else str(mean)) + spread
        text += f"\n## Mean ± std over seeds {sorted(table.seed.unique().tolist())}\n\n" + summary.reset_index().to_markdown(index=False) + "\n"
    if baseline is not None and baseline in set(table.row):
        text += (f"\n## Difference from {baseline}, paired by seed (mean ± std)\n\n"
                 + paired_differences(table, baseline).to_markdown(index=False) + "\n")
    (results / "table.md").write_text(text)
    return table


def default_results(table: str, profile: str) -> Path:
    return Path(__file__).resolve().parent / "results" / f"{table}-{profile}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dataset root with images_square/")
    parser.add_argument("--table", default="paper", help="a folder of row configs in experiments/configs/")
    parser.add_argument("--profile", default="smoke", help="a profile of that folder's profiles.json")
    parser.add_argument("--only", nargs="+", default=None, help="run only these rows")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="override the profile's seeds")
    parser.add_argument("--results", type=Path, default=None, help="default: experiments/results/<table>-<profile>")
    parser.add_argument("--force", action="store_true",
                        help="rerun rows already done and start interrupted ones over (earlier runs are kept aside)")
    args, extra_flags = parser.parse_known_args(argv)

    profiles = json.loads((CONFIGS / args.table / "profiles.json").read_text())
    if args.profile not in profiles:
        sys.exit(f"error: unknown profile {args.profile!r}; choose from {', '.join(profiles)}")
    profile = profiles[args.profile]
    results = args.results or default_results(args.table, args.profile)
    rows = load_rows(args.table, args.only)
    configs = row_configs(rows, profile, f"profile {args.profile} of {args.table}")
    for name in rows:
        for seed in args.seeds or profile["seeds"]:
            out = results / "runs" / f"{name}-seed{seed}"
            plan = plan_run(out, args.force)
            if plan.set_aside_as is not None:
                kept = set_aside(out, plan.set_aside_as)
                if plan.stale is not None:
                    print(f"{out.name}: stale, its saved config no longer replays ({plan.stale}); "
                          f"kept as {kept.name}, running it again", flush=True)
            if plan.step == SKIP:
                print(f"{out.name}: {SKIP}")
                continue
            continued = plan.step == CONTINUE
            row_config = results / "configs" / f"{out.name}.json"
            row_config.parent.mkdir(parents=True, exist_ok=True)
            row_config.write_text(json.dumps(configs[name], indent=2))
            # One cache for every row: students of the same teachers (rows of one seed) label once.
            command = [sys.executable, "-m", "detect_waste_cls.cli", "train", "--config", str(row_config),
                       "--data", str(args.data), "--out", str(out), "--seed", str(seed), "--no-progress-bar",
                       "--cache-dir", str(results / "runs"),
                       *(["--resume", RESUME_AUTO] if continued else []), *extra_flags]
            print(f"{out.name}: {plan.step}", flush=True)
            wall = run_row(command, out, results / "logs" / f"{out.name}.log", name, seed, continued)
            print(f"{out.name}: {wall:.0f} s", flush=True)
    # The table covers every finished run here, not only this invocation's rows.
    summaries = [summary for run in finished_runs(results) for summary in summarize_run(run)]
    table = write_tables(results, summaries, profile.get("baseline"))
    print(table.to_string(index=False))
    print(f"\nwrote {results / 'table.md'} and {results / 'table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
