"""The CLI's subcommands, one module each (``run``, ``check``, ``events`` ...).

Each module exposes ``configure(parser) -> None``: it adds its arguments to the parser
``mfo_actors.cli`` made for it (``cli.COMMANDS`` names the module and the help line) and
sets ``func=<callable(args) -> int>``. Only the module of the command being run is imported.
"""
