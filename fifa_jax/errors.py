"""Error classes for bad input: the CLI prints these as one line (no traceback).

Anything else that escapes a stage is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input data, a bad checkpoint or a bad path; the message names the file/row/key."""


class ConfigError(ValueError):
    """A configuration value or key is wrong (the message names it)."""


class Interrupted(RuntimeError):
    """A stage stopped on a signal after saving its progress; rerunning the command resumes.
    `signum` is the signal (the CLI exits with 128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
