"""The errors a user can act on; entry points print them as one line instead of a traceback."""

from raytr.config import ConfigError

# ValueError covers ConfigError, InputError, SchemaError and bad arguments; FileNotFoundError a
# missing dataset or model directory.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)

__all__ = ["ConfigError", "USER_ERRORS"]
