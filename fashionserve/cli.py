"""What every CLI shares: expected failures end as one line on stderr and exit code 2."""

import argparse
import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure the user can fix (bad argument, missing file); shown as one line."""


def _os_message(exc: OSError) -> str:
    """'<reason>: <path>' for a file-system error (existing file where a folder is wanted, no space...)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {exc.filename}" if exc.filename else reason


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush into a closed pipe stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run(main: Callable[[], int | None], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Call `main` and exit with its status; expected errors print `error: <message>` and exit 2.

    File-system errors (OSError: a file where a folder is wanted, permission denied, disk full) are
    expected errors too; a closed stdout pipe (e.g. `| head -1`) ends the command quietly with 2."""
    try:
        sys.exit(main() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        silence_stdout()
        print("error: the output pipe was closed", file=sys.stderr)
        sys.exit(2)
    except (UserError, OSError, *expected) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, expected):
            message = _os_message(exc)
        else:
            message = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (network widths, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def output_folder(path: os.PathLike | str) -> None:
    """Create the folder results go to; refuse an existing file there (before any work is done)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} exists and is not a folder; give a folder for the results")
    os.makedirs(path, exist_ok=True)
