"""The errors a user can act on; entry points print them as one line instead of a traceback."""

from __future__ import annotations

from raytr.config import ConfigError


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept. The message names the
    step and what to change (learning rate, bf16, gradient clipping)."""


# ValueError covers ConfigError, InputError, SchemaError and bad arguments; FileNotFoundError a
# missing dataset or model directory; TrainingDivergedError a run whose settings made it diverge.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, TrainingDivergedError)

# The operating system's path errors (an input or output that is a file where a directory is needed,
# or the reverse, exists, or may not be written): user errors when they name the path. One without a
# filename did not come from a path the user gave, and stays a traceback.
PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, FileExistsError, IsADirectoryError,
                                          NotADirectoryError, PermissionError)


def one_line(error: BaseException, limit: int | None = None) -> str:
    """`Type: message` of an error on one line (libraries' messages may span several), cut to
    `limit` characters: for quoting it inside a message of ours."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def path_error_message(error: BaseException) -> str | None:
    """One line naming the path(s) of a PATH_ERRORS error (None when it names no path)."""
    if not isinstance(error, PATH_ERRORS) or error.filename is None:
        return None
    reason = error.strerror or type(error).__name__
    paths = repr(str(error.filename)) + (f" -> {str(error.filename2)!r}" if error.filename2 is not None else "")
    return f"{paths}: {reason}"


def user_error_message(error: BaseException) -> str | None:
    """The one line an entry point prints for a user error (None: not one, let it be a traceback).
    An error a Ray task raised arrives wrapped, its message holding the remote traceback: the line
    is the task's own error's."""
    cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError (not imported: Ray is heavy)
    if isinstance(cause, BaseException) and cause is not error:
        return user_error_message(cause)
    if isinstance(error, PATH_ERRORS):  # before USER_ERRORS: FileNotFoundError is in both
        message = path_error_message(error)
        if message is not None:
            return message
    return str(error) if isinstance(error, USER_ERRORS) else None  # a path error naming no path is not the user's


__all__ = ["ConfigError", "PATH_ERRORS", "TrainingDivergedError", "USER_ERRORS", "path_error_message",
           "user_error_message"]
