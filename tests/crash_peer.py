"""A bench peer that dies the way a llama.cpp build with AMX kernels dies on a VM that traps them
(`python -m tests.crash_peer`, the spec on stdin): SIGILL for the transformers spec, SIGSEGV otherwise."""

import json
import os
import signal
import sys

if __name__ == "__main__":
    spec = json.loads(sys.stdin.read())
    os.kill(os.getpid(), signal.SIGILL if spec["kind"] == "transformers" else signal.SIGSEGV)
