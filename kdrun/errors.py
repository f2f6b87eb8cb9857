"""Errors meant for people: each carries one message naming the place and the fix."""


class KdrunError(Exception):
    """A problem the user can fix; the CLI prints its message alone, no traceback."""


class ConfigError(KdrunError):
    """A config value is wrong (the message names the key)."""


class DataError(KdrunError):
    """A data file is missing, unreadable or malformed (the message names file and line)."""


class ModelLoadError(KdrunError):
    """A model cannot be loaded (the message names it and how to pass a local copy)."""


class NonFiniteLossError(KdrunError):
    """The loss became NaN or inf."""
