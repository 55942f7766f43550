"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, path, shard or checkpoint), not a bug in distgan."""


def user_message(exc: BaseException) -> str:
    """The message of a UserError, also when a DataLoader worker re-raised it with its traceback."""
    text = str(exc)
    marker = "UserError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return text


class RunFailed(Exception):
    """The run cannot go on (it diverged, or lost a rank); the message says why and what is intact.
    The CLI prints it and exits with status 1."""
