"""What the benchmarks share: the results files (benchmarks/results/<name>-<cpu|gpu>.json and .md, stamped with the
date and the machine), and waiting for the GPU before a clock is read."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 1,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def describe(info: dict) -> str:
    return f"{info['cores']}-core {info['cpu']}, GPU: {info['gpu']}, torch {info['torch']}"


def write_results(name: str, results: dict, markdown: str) -> Path:
    """Writes <name>-<cpu|gpu>.json and .md under benchmarks/results/ and prints the markdown."""
    info = machine()
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}-{kind}"
    stamped = {"benchmark": name, "date": date.today().isoformat(), "machine": info, **results}
    stem.with_suffix(".json").write_text(json.dumps(stamped, indent=2) + "\n")
    text = f"# {name}\n\n{date.today().isoformat()}, {describe(info)}\n\n{markdown.strip()}\n"
    stem.with_suffix(".md").write_text(text)
    print(text)
    return stem


def synchronize(device: torch.device) -> None:
    """GPU work is asynchronous: wait for it before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize()
