"""The artifact store, on a local directory and on fsspec's in-memory filesystem."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool.artifacts import ArtifactStore


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "artifacts"))
    else:
        root = f"memory://spool-test-{uuid.uuid4().hex}"
        s = ArtifactStore(root)
        yield s
        if s.fs.exists(s.root):
            s.fs.rm(s.root, recursive=True)


def test_put_then_open(store: ArtifactStore) -> None:
    store.put("job_a", "image-0.png", b"\x89PNG one")
    store.put("job_a", "image-1.png", b"two")
    store.put("job_b", "image-0.png", b"other job")
    assert store.open("job_a", "image-0.png") == b"\x89PNG one"
    assert store.open("job_b", "image-0.png") == b"other job"
    assert store.names("job_a") == ["image-0.png", "image-1.png"]
    store.put("job_a", "image-0.png", b"replaced")
    assert store.open("job_a", "image-0.png") == b"replaced"


def test_missing_artifact_is_file_not_found(store: ArtifactStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.open("job_a", "image-0.png")
    store.put("job_a", "image-0.png", b"x")
    with pytest.raises(FileNotFoundError):
        store.open("job_a", "image-9.png")
    assert store.names("job_none") == []


@pytest.mark.parametrize(
    "job_id, name",
    [
        ("job_a", "../job_b/image-0.png"),
        ("job_a", "sub/file.png"),
        ("job_a", ".."),
        ("job_a", ".hidden"),
        ("job_a", ""),
        ("job_a", "a..b"),
        ("job_a", "name\n"),
        ("..", "image-0.png"),
        ("job/a", "image-0.png"),
    ],
)
def test_names_cannot_escape_the_job_folder(store: ArtifactStore, job_id: str, name: str) -> None:
    store.put("job_b", "image-0.png", b"secret")
    with pytest.raises(ValueError):
        store.put(job_id, name, b"x")
    with pytest.raises(FileNotFoundError):
        store.open(job_id, name)
    assert store.open("job_b", "image-0.png") == b"secret"


def test_delete_job_removes_only_that_job(store: ArtifactStore) -> None:
    store.put("job_a", "image-0.png", b"a")
    store.put("job_a", "image-1.png", b"a")
    store.put("job_b", "image-0.png", b"b")
    store.delete_job("job_a")
    store.delete_job("job_a")  # twice is fine
    with pytest.raises(FileNotFoundError):
        store.open("job_a", "image-0.png")
    assert store.names("job_a") == []
    assert store.open("job_b", "image-0.png") == b"b"


def test_local_store_writes_under_its_directory(tmp_path: Path) -> None:
    ArtifactStore(str(tmp_path / "a")).put("job_x", "out.png", b"data")
    assert (tmp_path / "a" / "job_x" / "out.png").read_bytes() == b"data"
    assert ArtifactStore(f"file://{tmp_path / 'a'}").open("job_x", "out.png") == b"data"


def test_default_store_follows_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spool import settings

    monkeypatch.setenv("SPOOL_ARTIFACTS_URL", str(tmp_path / "from-env"))
    settings.get.cache_clear()
    try:
        ArtifactStore.default().put("job_d", "x.bin", b"1")
        assert (tmp_path / "from-env" / "job_d" / "x.bin").read_bytes() == b"1"
        assert ArtifactStore.default() is ArtifactStore.default()
    finally:
        monkeypatch.undo()
        settings.get.cache_clear()
