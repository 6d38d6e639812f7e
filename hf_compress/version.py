"""The package version, in one place: the package root re-exports it, the modules read it from here."""

__version__ = "0.1.0"
