"""Error types raised on bad input, before any work starts.

Every error names the problem and the fix. The CLI catches :class:`ReconJaxError`
and prints its message instead of a traceback.
"""


class ReconJaxError(ValueError):
    """Base class for user-facing input errors."""


class DataError(ReconJaxError):
    """A dataset name, file or array is missing, corrupt or malformed."""


class CheckpointError(ReconJaxError):
    """A checkpoint is missing, corrupt, or does not fit the architecture."""


class ConfigError(ReconJaxError):
    """A configuration value is out of range or unknown."""
