"""The one error type every reader, writer and converter raises for bad input."""


class ConversionError(ValueError):
    """A weight file or config could not be read or converted.

    The message always names the file (or key) and the problem, so that a CLI can print it
    as a single line without a traceback.
    """


class MalformedInput(ValueError):
    """Bytes a reader cannot accept, found where the file name is not known (a LevelDB block, a
    protobuf, a pickle opcode). The reader's entry point re-raises it as a ConversionError naming
    the file, with this as its cause."""
