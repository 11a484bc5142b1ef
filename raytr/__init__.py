"""raytr: session-based recommendation with transformer models on Ray."""

__version__ = "0.1.0"
