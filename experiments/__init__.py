"""Experiments: each module builds a config and calls the library (`python -m experiments.<name>`)."""
