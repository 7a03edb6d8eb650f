"""`python -m cli ...` runs the `partinfer` command line."""
from cli.app import main

main()
