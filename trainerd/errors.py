"""Errors a user can cause. Each message is one line; the CLI prints it and exits 2.

Kept free of torch so that `status`, `wait` and `stop` (which never import torch) can still
name and catch every one of them."""


class TrainerdError(Exception):
    """Anything a user can cause and fix (bad config, bad run dir, corrupt checkpoint ...)."""


class ConfigError(TrainerdError):
    """A bad configuration."""


class CheckpointError(TrainerdError):
    """A missing or corrupt checkpoint."""


class ResumeError(TrainerdError):
    """A run that cannot be resumed as asked."""


class UserError(TrainerdError):
    """Anything else a user can cause (bad argument, missing file ...)."""
