"""WSGI entry point for gunicorn: `api.wsgi:app`."""

from __future__ import annotations

from api import create_app
from spool.logs import configure

configure("api")
app = create_app()
