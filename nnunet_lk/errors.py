"""Error types shared by every room (no imports, so blocks can raise them without cycles)."""


class NetworkConfigError(ValueError):
    """A plans configuration or option that a backbone cannot build; the message names the fix."""
