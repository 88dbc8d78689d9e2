"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and where."""


class ConfigError(UserError):
    """A configuration key or value is wrong; the message names the key."""


class DataError(UserError):
    """A data file is malformed: the message names the file, line and field."""


class IndexMismatchError(UserError):
    """An index on disk is not what was asked for, or is incomplete."""



class RetrievalError(RuntimeError):
    """The retrieval service failed (network, timeout, overload, a server error) or answered something
    that is not Search-R1's format. The only retriever error the agent turns into a notice for the
    model; any other exception from a retriever is a bug and propagates. A user's own retriever raises
    it for transient trouble it wants treated the same way."""


class RetrievalUnavailableError(UserError):
    """Retrieval failed on too many consecutive turns (``retrieval.max_failed_turns``): the service is
    down or misconfigured. The message names the retriever and its last error."""


class EngineError(RuntimeError):
    """A generation engine failed while generating or loading weights, on this process or (under several
    processes) on another one; the message says what was being done and on which rank. Not bad input:
    the CLI prints it as one line and exits with status 1."""
