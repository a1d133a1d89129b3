"""What a batch carries, named once: datasets write these keys, the model and the refresh callback read them."""

IMAGE = "image"  # the view a step trains on (or, in eval loaders, the eval view)
EVAL_IMAGE = "eval_image"  # per_batch pseudo-labeling: the eval view the labels are computed from
TARGET = "target"  # class index, for labeled images only
INDEX = "index"  # position in the dataset: pseudo-labels are looked up by it
LABELED, PSEUDO = "labeled", "pseudo"  # the two loaders of a pseudo-labeling training step
# Set on a pseudo batch by the refresh callback, from its store: class indices or distributions, and how much each
# image counts in the loss (0: below its threshold).
PSEUDO_TARGET, WEIGHT = "pseudo_target", "weight"
