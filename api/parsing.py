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
            return self.handle_invalid_json_error(ValueError("JSON nested too deeply"), req)


class Blueprint(_Blueprint):
    ARGUMENTS_PARSER = SpoolParser()
