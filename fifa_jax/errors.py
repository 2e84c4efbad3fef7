"""Error classes for bad input: the CLI prints these as one line (no traceback).

Anything else that escapes a stage is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input data, a bad checkpoint or a bad path; the message names the file/row/key."""
