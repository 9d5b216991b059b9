"""One module per ``gradlens`` subcommand (see :mod:`gradlens.cli`)."""
