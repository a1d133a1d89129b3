"""Training across machines: two torchrun "nodes" on localhost (CPU, gloo, one process each) train one run together."""

import json
import socket
import subprocess

import pandas as pd
import pytest
import torch

from conftest import COLOURS, PYTHON, REPO_ROOT, make_tree, train_args
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.resolve import device_settings
from detect_waste_cls.run_folder import create_run_dir
from detect_waste_cls.config import RunConfig


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_torchrun_nodes_train_one_run_with_identical_stores_and_test_once(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {n: 8 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}, pseudo=15)
    run, dumps, port = tmp_path / "run", tmp_path / "dumps", free_port()
    args = train_args(data, run, "--num-nodes", "2", "--devices", "1", "--pseudo", "per_epoch",
                      "--pseudo-start", "1", "--pseudo-threshold", "0")
    nodes = [
        subprocess.Popen(
            [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
             "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(REPO_ROOT / "tests" / "ddp_probe.py"), str(dumps), *args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        finally:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), "\n\n".join(output[-3000:] for output in outputs)

    # One world of two ranks: each node held one shard, and the gathered stores agree.
    rank0, rank1 = (torch.load(dumps / f"end_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    for key in ("probabilities", "epoch"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert bool((rank0["epoch"] == 1).all())  # every image relabeled at epoch 1, half of them by each node
    # One run folder: one config, one log, one pseudo-label table, and the test metrics written once.
    assert json.loads((run / "config.json").read_text())["run"]["num_nodes"] == 2
    assert sorted(p.name for p in run.parent.iterdir()) == ["data", "dumps", "run"]
    assert len(pd.read_csv(run / "pseudo_labels.csv")) == 15
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert sum(output.count("test metrics of") for output in outputs) == 1
    epochs = pd.read_csv(run / "metrics.csv")["epoch"].dropna().astype(int)
    assert sorted(epochs.unique().tolist()) == [0, 1]


def test_multinode_needs_one_named_run_folder_and_uses_ddp(tmp_path):
    with pytest.raises(UserInputError, match="--num-nodes 2 needs --out"):
        create_run_dir(None, "model", num_nodes=2)
    settings = device_settings(RunConfig(accelerator="cpu", devices="1", num_nodes=2))
    assert settings["num_nodes"] == 2 and settings["strategy"] == "ddp"
    with pytest.raises(UserInputError, match="--num-nodes 0"):
        device_settings(RunConfig(num_nodes=0))
