"""User-facing errors: the CLI prints their message as one line and exits with status 2."""


class UsageError(Exception):
    """Bad input other than a config value: a path, a data set, a checkpoint, a token id."""
