"""Retention: past SPOOL_RESULT_RETENTION_S the sweeper deletes artifacts and expires outputs."""

from __future__ import annotations

from spool.artifacts import ArtifactStore
from tests import support


def test_outputs_and_artifacts_retired(services: support.Services, tmp_path) -> None:
    p = support.IsolatedPlatform(services, tmp_path, {"SPOOL_RESULT_RETENTION_S": "2"})
    try:
        p.start_api()
        p.start_worker(models="echo", queues="spool.cpu")
        p.start_beat()
        api = support.Api(p.url, p.user())
        job = api.submit({"value": "keep me a while"})
        done = api.wait(job["id"])
        assert done["output"] == {"value": "keep me a while"}
        store = ArtifactStore(str(tmp_path / "artifacts"))
        store.put(job["id"], "0.png", b"not really a png")
        assert api.get(f"/v1/files/{job['id']}/0.png").status_code == 200
        support.wait_until(
            lambda: api.get(f"/v1/jobs/{job['id']}").json()["output"].get("expired"),
            timeout=30,
            what="output retired",
        )
        assert api.get(f"/v1/files/{job['id']}/0.png").status_code == 404
        assert store.names(job["id"]) == []
        assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    finally:
        p.close()
