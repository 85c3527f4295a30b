"""Errors raised by fints. Each names the problem in words a user can act on."""


class FintsError(Exception):
    """Base class of every error fints raises on purpose."""


class InvalidInputError(FintsError, ValueError):
    """User-supplied data (history lines, requests, vectors) is malformed.

    ``param`` names the offending field where there is one (e.g. ``"strengths"``),
    so a server can point at it.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class LimitExceededError(InvalidInputError):
    """A configured resource limit was reached; ``limit`` names the setting (e.g.
    ``max_items_per_user``)."""

    def __init__(self, message: str, *, limit: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.limit = limit


class StoreUnavailableError(FintsError):
    """The store refuses writes: it is read-only (``reason`` "read_only") or its disk is
    full ("full"). Reads, and generation that needs no write, keep working."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class CorruptDataError(FintsError):
    """Stored data failed its checksum (or cannot be decoded); it is reported, never used."""


class UnknownUserError(FintsError, KeyError):
    """The named user has no data in this tenant."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else "unknown user"


class DictionaryMismatchError(FintsError):
    """A steering dictionary does not fit the model it is being used with."""


class UnsupportedModelError(FintsError):
    """fints cannot find the decoder layers / attention / MLP modules of a model."""
