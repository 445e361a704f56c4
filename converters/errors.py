"""The one error type every reader, writer and converter raises for bad input, and the one
translation of OS and decoding errors into messages that name the file (`file_error`)."""

from converters.text import shown

NEWLINE = b"\n"


class ConversionError(ValueError):
    """A weight file or config could not be read or converted.

    The message always names the file (or key) and the problem, so that a CLI can print it
    as a single line without a traceback.
    """


class MalformedInput(ValueError):
    """Bytes a reader cannot accept, found where the file name is not known (a LevelDB block, a
    protobuf, a pickle opcode). The reader's entry point re-raises it as a ConversionError naming
    the file, with this as its cause."""


def file_error(path: object, error: Exception, doing: str = "read", cls: type = ValueError) -> ValueError:
    """The one translation of an OS or decoding error into a one-line `cls` that names the file:

        PATH: cannot read (Permission denied)       PATH: is a directory, expected a file
        PATH: not UTF-8 text at line 3              PATH: cannot write (No space left on device)

    `doing` is what failed ("read", "write", "read config", "list the output directory").
    Raise it `from` the original error so --debug still shows the cause. The line number is
    exact when the decoded bytes were the whole file (`bytes.decode`), not a stream chunk.
    """
    if isinstance(error, UnicodeDecodeError):
        data = error.object if isinstance(error.object, bytes) else b""
        where = f" at line {data[:error.start].count(NEWLINE) + 1}" if data else ""
        return cls(f"{shown(path)}: not UTF-8 text{where}")
    if isinstance(error, IsADirectoryError) and doing.startswith("read"):
        return cls(f"{shown(path)}: is a directory, expected a file")
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return cls(f"{shown(path)}: cannot {doing} ({shown(reason)})")
