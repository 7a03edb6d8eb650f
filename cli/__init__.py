"""The `partinfer` command line, the top layer: thin typer commands over the library API."""

from partinfer.common.process_env import apply_process_env
from partinfer.runtime.process_memory import fix_mmap_threshold

apply_process_env()  # before any command imports torch
fix_mmap_threshold()
