"""`python -m runtime ...` runs the `partinfer` CLI."""
from runtime.cli import main

main()
