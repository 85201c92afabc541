"""The one exception type for mistakes a user can fix."""


class KernormError(Exception):
    """A user-caused error: a bad option, a missing or corrupt file, a wrong input.

    Its message is one line that names the thing and the fix; the CLI prints it
    as is and exits non-zero, without a traceback.
    """


def check_choice(what, value, choices):
    """Raises a `KernormError` naming `choices` unless `value` is one of them."""
    if value not in choices:
        raise KernormError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
