"""The `partinfer` command line, the top layer: thin typer commands over the library API."""

from partinfer.common.process_env import apply_process_env

apply_process_env()  # before any command imports torch
