"""Run configurations: one file per constitution x scope, all built on base.py."""
