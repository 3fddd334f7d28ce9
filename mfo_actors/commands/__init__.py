"""The CLI's subcommands, one module each (``run``, ``check``, ``events`` ...).

Each module exposes ``register(subparsers) -> None``: it adds its parser and sets
``func=<callable(args) -> int>``. ``mfo_actors.cli`` imports the modules it knows and skips
the ones that do not exist.
"""
