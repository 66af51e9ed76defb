"""The package version (one place; ``cellvae.__version__`` and saved models read it from here)."""

__version__ = "0.1.0"
