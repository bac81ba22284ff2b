"""relay: one API for gpt-image-1.5 across asynchronous resellers."""

__version__ = "0.1.0"
