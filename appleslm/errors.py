"""The one root of appleslm's errors: anything that ends a command with a message for the user.

Every error a user can cause (a bad config value, a missing file, a corrupt checkpoint, a Hub
that does not answer) is an `AppleslmError` subclass whose message says what is wrong and what to
do; the CLI prints it and exits 2. Anything else is a bug and keeps its traceback.
"""


class AppleslmError(Exception):
    """A failure the user can act on; `str(error)` is the whole message."""


class MissingFileError(AppleslmError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ExistingFileError(AppleslmError, FileExistsError):
    """An output the user named exists already and would be overwritten."""
