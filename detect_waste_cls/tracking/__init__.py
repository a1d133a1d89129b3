"""Experiment tracking: the logger factory (loggers.py) and the Neptune adapter with its offline reader (neptune.py)."""

from detect_waste_cls.tracking.loggers import LOGGER_BUILDERS, build_loggers, log_evaluation
from detect_waste_cls.tracking.neptune import NeptuneLogger, read_offline_neptune_run

__all__ = ["LOGGER_BUILDERS", "NeptuneLogger", "build_loggers", "log_evaluation", "read_offline_neptune_run"]
