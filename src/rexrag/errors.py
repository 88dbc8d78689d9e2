"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and where."""


class ConfigError(UserError):
    """A configuration key or value is wrong; the message names the key."""


class DataError(UserError):
    """A data file is malformed: the message names the file, line and field."""


class IndexMismatchError(UserError):
    """An index on disk is not what was asked for, or is incomplete."""

