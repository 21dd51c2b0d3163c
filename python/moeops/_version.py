"""The version of moeops (also in pyproject.toml)."""

__version__ = "0.1.0"
