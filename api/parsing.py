"""Request parsing shared by the blueprints: JSON that cannot crash the parser."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint as _Blueprint
from webargs.flaskparser import FlaskParser


class SpoolParser(FlaskParser):
    def _raw_load_json(self, req: Any) -> Any:
        try:
            return super()._raw_load_json(req)
        except RecursionError:
            # Absurdly deep JSON is a malformed request (400), not a crash.
            from webargs.flaskparser import abort

            abort(400, messages={"json": ["JSON nested too deeply"]})


class Blueprint(_Blueprint):
    ARGUMENTS_PARSER = SpoolParser()
