"""The command-line layer: parses options and calls the core (the core never imports Typer or rich)."""
