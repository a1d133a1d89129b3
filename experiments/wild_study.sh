#!/bin/bash
# The TrashNet -> AquaTrash study, end to end (experiments/results/wild_study-*/README.md has the results).
# Usage: bash experiments/wild_study.sh DATA WORK   (DATA holds trashnet/ and aquatrash/; WORK: a scratch folder)
# CPU: about 25 min of features (lite0 with AdaBN; lite1, lite2), 5 min of probes, then about 2 h of fine-tuning.
set -euo pipefail
DATA=${1:-../shared/data}
WORK=${2:-/tmp/wild}
PY=${PYTHON:-python}
R=experiments/results/wild_study-cpu160

# 1. The frozen-feature sweep: every method on cached ImageNet features, 3 seeds.
$PY -m experiments.wild_features --data "$DATA" --cache "$WORK/features"
$PY -m experiments.wild_sweep --cache "$WORK/features" --out experiments/results/wild_study-frozen

# 2. The fine-tuned rows: one images_square tree per seed (10% of TrashNet in train/, the seed's unlabeled half
#    of the AquaTrash crops in pseudolabel/, the other half in test/).
$PY -m experiments.wild_trees --data "$DATA" --out "$WORK/trees" --seeds 0 1 2
run() { $PY -m experiments.reproduce --data "$1" --table wild_study --profile cpu-160 --seeds "$2" --results "$3" \
          --only "${@:4}"; }
for s in 0 1 2; do run "$WORK/trees/seed$s" $s $R supervised adamatch; done

# 3. 100 target labels: `select` picks from the seed's source-only model, the folder labels answer.
for s in 0 1 2; do
  for strategy in cluster-margin random; do
    picks="$WORK/picks/$strategy-100-seed$s"
    [ -e "$picks/selection.csv" ] || $PY -m detect_waste_cls.cli select --model $R/runs/supervised-seed$s \
      --data "$WORK/trees/seed$s" --budget 100 --strategy $strategy --seed $s --out "$picks"
    tree="$WORK/trees/seed$s-$strategy-100"
    [ -e "$tree" ] || $PY -m experiments.wild_trees --tree "$WORK/trees/seed$s" --picks "$picks/selection.csv" \
      --out "$tree"
  done
  run "$WORK/trees/seed$s-cluster-margin-100" $s $R-100-cluster-margin supervised adamatch
  run "$WORK/trees/seed$s-random-100" $s $R-100-random supervised
done

# 4. The remaining no-label rows.
for s in 0 1 2; do run "$WORK/trees/seed$s" $s $R supervised-balanced adamatch-target-bn; done
for s in 0 1 2; do run "$WORK/trees/seed$s" $s $R student; done
