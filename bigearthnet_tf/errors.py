"""The one exception type for mistakes a user can fix (bad input, bad config, bad paths).

The command line prints such an error as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file, patch, key or value at fault."""

    exit_code = 1


class ConfigError(UserError):
    """A problem with a configuration file or its values."""

    exit_code = 2
