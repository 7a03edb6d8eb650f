"""The one exception type the CLI turns into a one-line message and exit code 2."""


class PartinferError(Exception):
    """A problem with the user's input or environment, stated with its fix.

    Raised anywhere in the library; `cli.app.main` prints `error: <message>` and exits 2
    instead of showing a traceback. Messages should name what is wrong and what to do.
    """
