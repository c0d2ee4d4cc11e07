"""Spool: what the API and the workers share (settings, models, state machine, events)."""

__version__ = "0.6.2"
