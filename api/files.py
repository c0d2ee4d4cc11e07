"""GET /v1/files/<job_id>/<name>: a job's artifacts, for its owner only."""

from __future__ import annotations

import mimetypes

from flask import Response
from flask_jwt_extended import jwt_required

from api import errors
from api.jobs import load_visible, read_limited
from api.parsing import Blueprint
from spool.artifacts import ArtifactStore

blp = Blueprint("files", __name__, url_prefix="/v1/files", description="Artifacts")


@blp.route("/<job_id>/<name>")
@jwt_required()
@read_limited
@blp.response(200, description="the artifact's bytes (e.g. image/png)")
def get_file(job_id: str, name: str):
    """Download an artifact of one of your jobs."""
    load_visible(job_id)  # another user's job answers 404, exactly as a missing one
    try:
        data = ArtifactStore.default().open(job_id, name)
    except (FileNotFoundError, ValueError) as exc:  # ValueError: a name like ../x
        raise errors.not_found("file") from exc
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    resp = Response(data, mimetype=ctype)
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp
