"""The paper's findings reproduced at small scale: ``python -m analyses.<name>``."""
