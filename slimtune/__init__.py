"""slimtune: find the best way to compress a transformer for a given piece of hardware."""

__version__ = "0.1.0"
