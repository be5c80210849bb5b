"""One module per `w2w` sub-command (see jobs/cli.py)."""
