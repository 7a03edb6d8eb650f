"""One place that turns failures into what a user sees: `error: <one line>` and exit 2 for our errors,
bad options and the known failures of libraries (malformed JSON, non-UTF-8 text, a full disk,
unreadable data); exit 130 on Ctrl-C; a genuine bug keeps its traceback, with a request to report it."""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback

import typer
from typer.core import TyperGroup

from partinfer.common.errors import PartinferError, disk_full_cause

OS_ERROR_FIXES = {
    errno.ENOSPC: "free some disk space and run again",
    errno.EDQUOT: "free some of your disk quota and run again",
    errno.EACCES: "check the permissions, or choose a path you can write",
    errno.EPERM: "check the permissions, or choose a path you can write",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOENT: "check the path",
    errno.EISDIR: "pass a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
}


def known_failure(e: BaseException) -> str | None:
    """A one-line message for failures of the user's input or environment that libraries raise; None for a bug."""
    full = disk_full_cause(e)
    if full is not None:
        e = full  # whatever wrapped it: the fix is disk space
    if isinstance(e, PartinferError):
        return str(e)
    if isinstance(e, OSError) and e.errno in OS_ERROR_FIXES:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or 'operating system error'}{where}; {OS_ERROR_FIXES[e.errno]}"
    if isinstance(e, UnicodeError):
        return f"text that is not valid UTF-8 ({e}); save the input as UTF-8"
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file"
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller --gamma, a shorter context or fewer tokens"
    module = type(e).__module__ or ""
    if module.startswith(("datasets", "safetensors", "pyarrow")):
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return f"could not read the data ({type(e).__name__}: {first}); check the file and its format"
    return None


class ErrorHandlingGroup(TyperGroup):
    """Every (sub)command: our errors and known library failures become `error: <one line>` and exit 2;
    Ctrl-C exits 130; anything else is a bug, shown with its traceback and a request to report it."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except typer.TyperException as e:  # a bad option value or a missing argument, as typer words it
            ctx_of_error = getattr(e, "ctx", None)
            hint = f" (see `{ctx_of_error.command_path} --help`)" if ctx_of_error is not None else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            typer.echo(f"error: {message}{hint}".replace("\n", " "), err=True)
            raise typer.Exit(2)
        except BrokenPipeError:  # `partinfer ... | head`: the reader left; end quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141)
        except KeyboardInterrupt:
            typer.echo("\ninterrupted", err=True)
            raise typer.Exit(130)
        except Exception as e:
            message = known_failure(e)
            if message is None:
                traceback.print_exc()
                typer.echo("partinfer: this is a bug; please report it with the command you ran and the traceback above",
                           err=True)
                raise typer.Exit(1)
            typer.echo(f"error: {message}".replace("\n", " "), err=True)
            raise typer.Exit(2)
