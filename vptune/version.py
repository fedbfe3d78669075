"""The library version (its own module, so that file writers can stamp it without importing the package)."""

__version__ = "0.1.0"
