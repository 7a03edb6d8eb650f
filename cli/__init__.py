"""The `partinfer` command line, the top layer: thin typer commands over the library API."""
