"""Shared runtime for the services: typed config, bus connection, launcher and CLI.

Wire formats live in `proto/`; this package holds what is not on the wire.
"""
