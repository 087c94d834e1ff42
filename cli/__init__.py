"""The ``calbench`` command line (Typer): thin shells over library functions."""
