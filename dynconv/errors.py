"""The error type of bad input, as opposed to a bug."""


class UserError(Exception):
    """Bad input (an unknown option, a layer the operator cannot take, a missing file, a config that cannot run),
    not a bug: the message is one line naming the problem and the fix, and entry points such as `train.py` print it
    without a traceback. Concrete errors also derive from the builtin type a caller would catch (`ValueError`,
    `TypeError`, `FileNotFoundError`)."""
