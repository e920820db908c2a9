"""Errors that user-facing entry points report as one line and exit 2."""


class UserError(Exception):
    """Bad input from a user: a config, a file, a CLI argument.

    The CLI prints ``str(error)`` on one line (no traceback) and exits 2.
    """


class ConfigError(UserError, ValueError):
    """A configuration value or file is invalid.

    Parameters
    ----------
    message : str
        What is wrong and what is allowed.
    path : tuple of str
        Key path inside the configuration, outermost first (``("array", "m")``).
    source : str or None
        The file the configuration came from, if any.
    """

    def __init__(self, message, *, path=(), source=None):
        self.message = message
        self.path = tuple(path)
        self.source = source
        super().__init__(str(self))

    def within(self, *outer, source=None):
        """The same error with ``outer`` keys prepended to its path (and ``source`` set)."""
        return ConfigError(self.message, path=(*outer, *self.path), source=source or self.source)

    def __str__(self):
        where = [self.source] if self.source else []
        if self.path:
            where.append(".".join(self.path))
        return ": ".join([*where, self.message])
