"""Pruning (issue 5): pure mask math here; methods and the CLI build on it."""
