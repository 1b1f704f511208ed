"""One exception type for bad user input, so entry points can print one clear line and exit non-zero."""


class ConfigError(ValueError):
    """Bad configuration or input. The message names the offending field/file and its value."""
