"""CLI subcommands (private): one module per command, see ``bcnn.cli``."""
