"""Job artifacts (e.g. generated images) in one store shared by workers and the API.

Any fsspec URL works: a local directory in development, `s3://bucket/prefix` (or gcs,
azure) in production, `memory://` in tests. Artifacts live at `<root>/<job_id>/<name>`.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any, ClassVar

import fsspec

# One path segment: no separators, no "..", no hidden files, no control characters.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ArtifactStore:
    _default: ClassVar[ArtifactStore | None] = None
    _default_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str, **storage_options: Any) -> None:
        if not url:
            raise ValueError("an artifact store needs a URL or a directory")
        self.url = url
        # auto_mkdir: a local store creates its job folders as files are written.
        if "://" not in url or url.startswith("file://"):
            storage_options.setdefault("auto_mkdir", True)
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")

    @classmethod
    def default(cls) -> ArtifactStore:
        """The process's store, at SPOOL_ARTIFACTS_URL."""
        from spool import settings

        url = settings.get().artifacts_url
        with cls._default_lock:
            if cls._default is None or cls._default.url != url:
                cls._default = cls(url)
            return cls._default

    def put(self, job_id: str, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(job_id, name), data)

    def open(self, job_id: str, name: str) -> bytes:
        """The artifact's bytes; FileNotFoundError when there is none (or the name is invalid)."""
        try:
            path = self._path(job_id, name)
        except ValueError as exc:
            raise FileNotFoundError(f"no artifact {name!r} for job {job_id!r}") from exc
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise
        except IsADirectoryError as exc:
            raise FileNotFoundError(f"no artifact {name!r} for job {job_id!r}") from exc

    def names(self, job_id: str) -> list[str]:
        """The job's artifact names, sorted (empty when it has none)."""
        folder = self._folder(job_id)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def delete_job(self, job_id: str) -> None:
        """Remove every artifact of a job; nothing to remove is fine."""
        folder = self._folder(job_id)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(folder, recursive=True)

    def _folder(self, job_id: str) -> str:
        if not isinstance(job_id, str) or not _SEGMENT.fullmatch(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return f"{self.root}/{job_id}"

    def _path(self, job_id: str, name: str) -> str:
        if not isinstance(name, str) or not _SEGMENT.fullmatch(name) or ".." in name:
            raise ValueError(f"invalid artifact name {name!r}")
        return f"{self._folder(job_id)}/{name}"
