"""User-facing errors: the CLI prints their message without a traceback."""


class ColdFusionError(Exception):
    """A problem the user can fix (bad config, missing package, bad file, ...)."""
