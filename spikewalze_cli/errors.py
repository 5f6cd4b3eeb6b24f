"""The one exception type that the CLI turns into a single-line message."""


class UserError(Exception):
    """Bad input that the user can fix: a missing file, an invalid config value, a corrupt checkpoint.

    The message names what was wrong (file, key or value) and what to do. The CLI prints it as one
    line and exits with status 2; `--debug` shows the traceback as well.
    """
