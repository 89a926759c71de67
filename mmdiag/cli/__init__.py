"""The command-line interface: typer commands, rich output, config files and exit codes."""
