"""The model registry: which models exist, their kind, source, device and input limits.

Read from a YAML file (SPOOL_MODELS_FILE, default: spool/models.yaml shipped with
the code). Both sides use it: the API to validate inputs against the limits and
route to a queue, the workers to load the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import yaml

from spool import settings

DEFAULT_FILE = Path(__file__).with_name("models.yaml")
KINDS = ("echo", "image.generate", "text.generate")


class RegistryError(RuntimeError):
    pass


# A limit a model's entry leaves out: the API refuses more at submit (422), the backends
# would on the GPU. One table for both, so that neither lets through what the other refuses.
KIND_LIMITS: dict[str, dict[str, Any]] = {
    "image.generate": {
        "min_width": 64,
        "max_width": 1024,
        "min_height": 64,
        "max_height": 1024,
        "max_steps": 150,
        "max_num_images": 8,
        "max_guidance_scale": 50.0,
    },
    "text.generate": {"max_tokens": 4096, "max_prompt_chars": 100_000},
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    source: str = ""
    dtype: str = "float32"
    device: str = "auto"
    max_batch_size: int = 1
    batch_wait_ms: float = 5.0
    limits: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def queue(self) -> str:
        return queue_name(self.name)

    def limit(self, key: str, fallback: Any = None) -> Any:
        """One of the model's input limits (e.g. `max_width`): the entry's, else its kind's
        (KIND_LIMITS), else `fallback`."""
        value = self.effective_limits.get(key)
        return fallback if value is None else value

    @cached_property  # read for every job's inputs; a spec never changes
    def effective_limits(self) -> dict[str, Any]:
        """The entry's limits over its kind's: what a job of this model may ask for."""
        return {**KIND_LIMITS.get(self.kind, {}), **self.limits}

    @property
    def defaults(self) -> dict[str, Any]:
        """Input values used when a job leaves them out (the entry's `defaults` mapping)."""
        return dict(self.options.get("defaults") or {})

    def resolved_source(self, base: Path) -> str:
        """A relative local path is relative to the var dir; a hub id stays as it is."""
        src = self.source.replace("${SPOOL_VAR_DIR}", str(base))
        return src


def queue_name(model: str) -> str:
    return f"spool.model.{model}"


# Settings an entry may have besides ModelSpec's fields, by kind: a misspelt one is an
# error when the registry is read, not a setting silently left out.
KIND_OPTIONS: dict[str, frozenset[str]] = {
    "echo": frozenset({"defaults"}),
    "image.generate": frozenset(
        {"defaults", "allow_download", "variant", "attention_slicing", "vae_slicing", "vae_tiling"}
    ),
    "text.generate": frozenset({"defaults", "allow_download", "variant"}),
}


def _spec(name: str, raw: dict[str, Any]) -> ModelSpec:
    kind = raw.get("kind")
    if kind not in KINDS:
        raise RegistryError(f"model {name!r}: kind must be one of {', '.join(KINDS)}")
    known = {"kind", "source", "dtype", "device", "max_batch_size", "batch_wait_ms", "limits"}
    unknown = sorted(set(raw) - known - KIND_OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(known | KIND_OPTIONS[kind]))
        raise RegistryError(
            f"model {name!r}: unknown setting(s) {', '.join(unknown)} for {kind} (known: {allowed})"
        )
    return ModelSpec(
        name=name,
        kind=kind,
        source=str(raw.get("source", "")),
        dtype=str(raw.get("dtype", "float32")),
        device=str(raw.get("device", "auto")),
        max_batch_size=int(raw.get("max_batch_size", 1)),
        batch_wait_ms=float(raw.get("batch_wait_ms", 5.0)),
        limits=dict(raw.get("limits") or {}),
        options={k: v for k, v in raw.items() if k not in known},
    )


def load(path: str | Path) -> dict[str, ModelSpec]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise RegistryError(f"cannot read model registry {path}: {exc}") from exc
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise RegistryError(f"{path}: `models` must be a mapping of name → spec")
    return {name: _spec(name, raw or {}) for name, raw in models.items()}


@lru_cache(maxsize=1)
def models() -> dict[str, ModelSpec]:
    return load(settings.get().models_file or DEFAULT_FILE)


def get(name: str) -> ModelSpec | None:
    return models().get(name)
