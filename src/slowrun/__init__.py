"""slowrun: data-efficient language-model pretraining (fixed token budget, unlimited compute)."""

__version__ = "0.1.0"


class SlowrunError(ValueError):
    """Bad input or state the user can fix; the CLI prints it as one line and exits with 2."""
