"""The converged linear probe: the LP step of LP-FT (Kumar et al. 2022), and all of `--finetune linear`.

The features are what the classification head sees from the frozen backbone in eval mode, each
the mean of the eval view and its mirror image, extracted once. An L2-regularized multinomial
logistic regression is fitted to them to convergence (scikit-learn, L-BFGS); its strength is
chosen on the validation split, or by stratified k-fold on the training split when the
validation split is too small to choose with. Its weights become the head, so fine-tuning
starts from the probe's optimum instead of a few epochs of Adam on augmented crops.

A teacher-mode student can fit its probe to the teachers' labels of the pseudolabel split too
(--pseudo-distill-probe; all of a `--finetune linear` student): each unlabeled image counts as one
row per class, weighted by the teacher's probability of that class (times the image's pseudo-label
weight), which makes scikit-learn's weighted cross-entropy the soft-target cross-entropy.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader

from detect_waste_cls.models.flip import flip_averaged
from detect_waste_cls.shards import gather_shards

log = logging.getLogger(__name__)

# Inverse L2 strengths tried (scikit-learn's C: the data term is summed over images, the penalty is ||W||^2 / 2).
PROBE_CS = tuple(float(c) for c in np.logspace(-2, 3, 11))
FALLBACK_C = 1.0  # when no class has two images to cross-validate with
MIN_VAL_IMAGES_PER_CLASS = 10  # below this the validation split is too noisy to choose C: k-fold on train instead
MAX_FOLDS = 5
MAX_ITERATIONS = 5000  # L-BFGS stops at convergence (tol 1e-4) long before this on these problems


@dataclass(frozen=True)
class Probe:
    """A fitted head: weight (classes x features), bias (classes), the chosen C and how it was chosen."""

    weight: torch.Tensor
    bias: torch.Tensor
    C: float
    chosen_by: str


def head_inputs(model: torch.nn.Module, head: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, targets) of every image in `loader`: the head's input, averaged over the image and its flip."""
    outputs = flip_averaged(model, loader, num_classes=head.out_features, head=head)
    return outputs.features, outputs.targets


@dataclass(frozen=True)
class SoftTargets:
    """Extra rows for the probe: features, a target distribution per image, and how much each image counts."""

    features: torch.Tensor
    probabilities: torch.Tensor
    weights: torch.Tensor


def _regression(C: float) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=MAX_ITERATIONS)


def _as_softmax_head(fitted: LogisticRegression, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit as a weight and bias for every class (scikit-learn keeps one row for two classes, none for absent ones)."""
    coef, intercept = fitted.coef_, fitted.intercept_
    if len(fitted.classes_) == 2:  # one logit difference d: the two logits -d/2 and +d/2 give the same softmax
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    # A class with no training image gets a zero row and a very low bias: the probe never predicts it.
    bias = np.full(num_classes, -1e4 if len(fitted.classes_) < num_classes else 0.0)
    weight[fitted.classes_], bias[fitted.classes_] = coef, intercept
    return torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32)


def fit_probe(train_features: torch.Tensor, train_targets: torch.Tensor, val_features: torch.Tensor | None = None,
              val_targets: torch.Tensor | None = None, *, num_classes: int, seed: int = 0,
              soft: SoftTargets | None = None) -> Probe:
    """Fit the probe to convergence, C chosen by validation log-loss, else by stratified k-fold on train.

    With `soft` (a distilled probe), C is chosen on the labeled images as without, then the probe is
    refitted at that C to the labeled images and the soft rows together.
    """
    x, y = train_features.double().numpy(), train_targets.numpy()
    val_big_enough = val_targets is not None and len(val_targets) >= MIN_VAL_IMAGES_PER_CLASS * num_classes
    if val_big_enough:
        vx, vy = val_features.double().numpy(), val_targets.numpy()
        fits = [_regression(C).fit(x, y) for C in PROBE_CS]
        losses = [log_loss(vy, fit.predict_proba(vx), labels=fit.classes_) if set(vy) <= set(fit.classes_) else np.inf
                  for fit in fits]
        best = int(np.argmin(losses))
        fitted, C, chosen_by = fits[best], PROBE_CS[best], f"validation log-loss ({len(vy)} images)"
    else:
        counts = np.bincount(y)
        folds = min(MAX_FOLDS, int(counts[counts > 0].min()))
        if folds >= 2 and len(counts[counts > 0]) > 1:
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
            with warnings.catch_warnings():  # scikit-learn 1.9 announces attribute changes this code does not read
                warnings.simplefilter("ignore", FutureWarning)
                fitted = LogisticRegressionCV(Cs=list(PROBE_CS), cv=splitter, scoring="neg_log_loss",
                                              max_iter=MAX_ITERATIONS).fit(x, y)
            C, chosen_by = float(np.atleast_1d(fitted.C_)[0]), f"{folds}-fold log-loss on {len(y)} training images"
        else:
            fitted, C, chosen_by = _regression(FALLBACK_C).fit(x, y), FALLBACK_C, "fallback (too few images per class)"
    passing = 0 if soft is None else int((soft.weights > 0).sum())
    if passing:  # no label passes: nothing to add to the fit
        fitted = _fit_with_soft_rows(x, y, soft, C)
        chosen_by += f"; refitted with {passing} teacher-labeled images"
    weight, bias = _as_softmax_head(fitted, num_classes)
    return Probe(weight, bias, C, chosen_by)


def _fit_with_soft_rows(x: np.ndarray, y: np.ndarray, soft: SoftTargets, C: float) -> LogisticRegression:
    """sum_i w_i sum_k p_ik (-log q_ik) is the weighted cross-entropy of one row per (image, class) of weight w_i p_ik."""
    row_weights = (soft.weights.double()[:, None] * soft.probabilities.double()).numpy()
    image, label = np.nonzero(row_weights > 1e-6)  # a class the teacher all but rules out adds nothing
    features = np.concatenate([x, soft.features.double().numpy()[image]])
    labels = np.concatenate([y, label])
    sample_weight = np.concatenate([np.ones(len(y)), row_weights[image, label]])
    return _regression(C).fit(features, labels, sample_weight=sample_weight)


class ConvergedProbe(pl.Callback):
    """Before the first training step, fit the probe on the labeled split and make it the head.

    `distill_from` (a teacher-mode PseudoLabelRefresh): the teachers label the pseudolabel split
    first, and the probe is fitted to those labels too (every rank labels, and extracts the
    features of, its shard). A resumed run keeps the head its checkpoint has. Under DDP rank 0 fits
    and broadcasts the head, so every rank starts from the same weights.
    """

    def __init__(self, distill_from=None):
        self.distill_from = distill_from

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return
        head, data = pl_module.head, trainer.datamodule
        soft = None
        if self.distill_from is not None:  # every rank: the teachers label, and the student's features come, in shards
            teacher_targets = self.distill_from.distillation_targets(trainer, pl_module)
            with trainer.precision_plugin.forward_context():
                shard = flip_averaged(pl_module, data.pseudo_inference_dataloader(trainer.global_rank, trainer.world_size),
                                      num_classes=head.out_features, head=head)
            indices, shard_features = gather_shards(pl_module, shard.indices, shard.features)
            features = torch.empty(len(teacher_targets[0]), head.in_features)
            features[indices] = shard_features
            soft = SoftTargets(features, *teacher_targets)
        probe = None
        if trainer.is_global_zero:
            with trainer.precision_plugin.forward_context():
                train = head_inputs(pl_module, head, data.probe_dataloader())
                val = head_inputs(pl_module, head, data.val_dataloader()) if data.has_own_val else (None, None)
            probe = fit_probe(*train, *val, num_classes=len(pl_module.classes), seed=data.seed, soft=soft)
            log.info("linear probe on %d images: C = %.3g, chosen by %s", len(train[1]), probe.C, probe.chosen_by)
        probe = trainer.strategy.broadcast(probe, src=0)
        with torch.no_grad():
            head.weight.copy_(probe.weight.view_as(head.weight))
            head.bias.copy_(probe.bias)
