"""What every CLI shares: expected failures end as one line on stderr and exit code 2."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure the user can fix (bad argument, missing file); shown as one line."""


def run(main: Callable[[], int | None], expected: tuple[type[BaseException], ...] = ()) -> None:
    """Call `main` and exit with its status; expected errors print `error: <message>` and exit 2."""
    try:
        sys.exit(main() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (UserError, FileNotFoundError, *expected) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
