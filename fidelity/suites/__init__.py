"""Bundled suite files (``*.toml``)."""
