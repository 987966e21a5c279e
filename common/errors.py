"""The small error hierarchy shared by both sides.

Every error says what was wrong and what to do about it; CLIs print the message (no traceback)
and exit with a non-zero status.
"""


class SpecRelayError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(SpecRelayError, ValueError):
    """A configuration field has a bad value, a bad type, or does not exist."""


class ContractError(SpecRelayError):
    """Two peers disagree on something they must agree on (ModelInfo, schema, dtype)."""


class SchemaError(SpecRelayError, ValueError):
    """A feature batch or request does not match the wire schema."""


class DataError(SpecRelayError, ValueError):
    """Input data is malformed (names the file and the record)."""


class ExportError(SpecRelayError):
    """A draft checkpoint cannot be exported in a form the serving engine would load correctly."""


class AssetError(SpecRelayError):
    """A model or dataset asset is missing or corrupt."""


class TargetUnavailableError(SpecRelayError):
    """No target server could serve the request within the allowed time."""


class OutputDirError(SpecRelayError, ValueError):
    """An output directory cannot be written without destroying something the command did not write."""
