"""The error family: every error a user can fix by changing their input is a `TargetSFTError`.

The CLI prints these as one line (exit 2) and Prefect tasks never retry them: they would only fail
again. Anything else (a CUDA out-of-memory error, a lost node, a bug) keeps its traceback and is
retried by the flows. One module owns the family so that every catch site names one class.
"""

from __future__ import annotations


class TargetSFTError(ValueError):
    """Base of every input error; the message says what is wrong and how to fix it."""


class ConfigError(TargetSFTError):
    """A configuration file or override is invalid; the message names the key."""


class DataError(TargetSFTError):
    """A dataset or row is unusable; the message says which and why."""


class PriorError(TargetSFTError):
    """The prior stage cannot run as configured; the message says why and how to fix it."""


class CacheError(PriorError):
    """A prior set is missing, incomplete, corrupted or does not match what the run expects."""


class TargetError(TargetSFTError):
    """An invalid target: unknown preset or key, or a parameter out of range."""


class TrainError(TargetSFTError):
    """The run cannot start or continue as configured; the message says what to change."""


class DivergedError(TrainError):
    """Training produced a non-finite loss, gradient or weight; the last good checkpoint is kept."""


class ModelError(TargetSFTError):
    """A model or tokenizer folder is missing, unreadable, or asks to run its own code."""


class EvalError(TargetSFTError):
    """Evaluation cannot run as configured; the message says what to change."""


class TrackingError(TargetSFTError):
    """A tracker in `train.report_to` cannot be used (e.g. its package is not installed)."""
