"""The one exception type the CLI turns into a one-line message and exit code 2."""

import errno


class PartinferError(Exception):
    """A problem with the user's input or environment, stated with its fix.

    Raised anywhere in the library; `cli.app.main` prints `error: <message>` and exits 2
    instead of showing a traceback. Messages should name what is wrong and what to do.
    """


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_cause(e: BaseException) -> OSError | None:
    """The "no space left" OSError behind `e`, however deeply a library wrapped it (datasets wraps its
    cache writes in its own errors), or None. A full disk needs that fix, not "check the file"."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None
