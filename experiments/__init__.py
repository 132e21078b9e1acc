"""Thin launchers, one per paper: `python -m experiments.<paper> --help`."""
