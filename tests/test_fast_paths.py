"""Fast paths: what each default resolves to where, and that the optional ones train exactly like the plain run."""

import json

import pandas as pd
import pytest

import lightning.pytorch as pl
import torch

from conftest import train_args
from detect_waste_cls.cli import build_parser, config_from_args
from detect_waste_cls.config import RunConfig
from detect_waste_cls.train import train


@pytest.mark.parametrize("on_gpu, bf16, precision", [
    (True, True, "bf16-mixed"),
    (True, False, "32-true"),  # GPUs before Ampere: no bf16, and fp16 needs loss scaling, so not by default
    (False, False, "32-true"),
])
def test_bf16_is_on_by_default_only_on_gpus_that_support_it(on_gpu, bf16, precision):
    assert RunConfig().resolved(on_gpu=on_gpu, bf16_supported=bf16).precision == precision
    assert RunConfig(precision="16-mixed").resolved(on_gpu=on_gpu, bf16_supported=bf16).precision == "16-mixed"


class NetworkLayout(pl.Callback):
    """What the network looks like when training starts: compiled or not, and its convolution weights' layout."""

    def on_train_start(self, trainer, pl_module):
        convolutions = [p for p in pl_module.model.parameters() if p.dim() == 4]
        # nn.Module.compile() (in place) routes calls through this attribute; None when not compiled.
        self.compiled = pl_module.model._compiled_call_impl is not None
        self.channels_last = all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                 for p in convolutions)


def test_compile_and_channels_last_train_like_the_plain_run(tiny_tree, tmp_path):
    runs = {"plain": ("--no-channels-last",), "fast": ("--compile",)}  # channels-last is the default
    layouts = {}
    for name, flags in runs.items():
        layouts[name] = NetworkLayout()
        args = build_parser().parse_args(train_args(tiny_tree, tmp_path / name, "--epochs", "1", *flags))
        train(config_from_args(args, "simple-cnn"), callbacks=[layouts[name]])
    assert (layouts["plain"].compiled, layouts["plain"].channels_last) == (False, False)
    assert (layouts["fast"].compiled, layouts["fast"].channels_last) == (True, True)
    plain, fast = (pd.read_csv(tmp_path / name / "metrics.csv") for name in runs)
    assert fast["val/loss"].dropna().tolist() == pytest.approx(plain["val/loss"].dropna().tolist(), abs=1e-3)
    recorded = json.loads((tmp_path / "fast" / "config.json").read_text())["run"]
    assert recorded["compile"] and recorded["channels_last"] and recorded["precision"] == "32-true"
    # The checkpoint of a compiled model loads into a plain one: same test metrics.
    assert json.loads((tmp_path / "fast" / "metrics.json").read_text())["accuracy"] == pytest.approx(
        json.loads((tmp_path / "plain" / "metrics.json").read_text())["accuracy"])
