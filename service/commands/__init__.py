"""Subcommands of the `tcnserve` CLI, one module each."""
