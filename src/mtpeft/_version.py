"""The package version (its own module, so that the library reads it without importing the package's
lazy public names)."""

__version__ = "0.1.0"
