"""The handlers of the `pdp` command, one module per kind of command; `pdp/cli.py` builds
the parser and wires them."""
