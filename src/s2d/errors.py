"""The one exception type a user can cause."""


class S2DError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
