"""The one error type every reader, writer and converter raises for bad input."""


class ConversionError(ValueError):
    """A weight file or config could not be read or converted.

    The message always names the file (or key) and the problem, so that a CLI can print it
    as a single line without a traceback.
    """
