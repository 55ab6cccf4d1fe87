"""The one error type of pymerge.io: a model file or directory that cannot be used as it is."""


class ModelFileError(ValueError):
    """A missing, unreadable, corrupt, truncated or unsafe model file (or directory), or models that do not
    match their base. The message names the file (and the key where there is one); the command line reports
    it as bad input (exit status 2)."""
