"""Command-line layer of the training-side commands (train, eval, sample, ensemble, ...)."""

COMMANDS: list = []
