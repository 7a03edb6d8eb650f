"""`python -m partinfer.cli ...` runs the `partinfer` command line."""
from partinfer.cli.app import main

main()
