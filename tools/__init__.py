"""The keras-embed command line: `cli.py` and one module per command."""
