"""The version of lstm-harness: one definition, read by the package, the reports and pyproject.toml."""

__version__ = "0.1.0"
