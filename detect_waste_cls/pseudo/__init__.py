PSEUDO_MODES = ("none", "per_batch", "per_epoch")
