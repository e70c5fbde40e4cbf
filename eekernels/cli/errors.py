"""How the subcommands report a user's mistake: one line on stderr, no traceback."""

from __future__ import annotations

import sys

#: exit status of a command stopped by bad input (as argparse's own usage errors)
USER_ERROR = 2


def user_error(cmd: str, msg: str) -> int:
    """Print ``eekernels CMD: error: MSG`` to stderr; return the exit status."""
    print(f"eekernels {cmd}: error: {msg}", file=sys.stderr)
    return USER_ERROR


def guarded(cmd: str, fn, *args) -> int:
    """``fn(*args)``, with bad input (ValueError, OSError, a backend that cannot run) as one line."""
    from ..backends import BackendUnavailableError

    try:
        return fn(*args)
    except (ValueError, BackendUnavailableError) as e:
        return user_error(cmd, str(e))
    except OSError as e:
        return user_error(cmd, f"{type(e).__name__}: {e}")
