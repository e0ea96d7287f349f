"""User-facing errors: the CLI prints their message as one line and exits with status 2."""


class UsageError(Exception):
    """Bad input other than a config value: a path, a data set, a checkpoint, a token id."""


def first_line(error: Exception, limit: int = 240) -> str:
    """The gist of a library's error (orbax, TensorStore, XLA, Pallas lowering): its first non-empty
    line, without C++ source locations, at most `limit` characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__).split(" [source locations=")[0][:limit]
