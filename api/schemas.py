"""Marshmallow schemas for auth and jobs: validation and the OpenAPI document.

Input limits come from the model registry, so an over-limit request is a 422
naming the field at submit time, never a surprise on the GPU.
"""

from __future__ import annotations

import json
from typing import Any

import marshmallow as ma
from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from api.webhook_guard import validate_webhook_url
from spool import registry
from spool.registry import ModelSpec

PRIORITY = validate.OneOf(["high", "normal", "low"])
WEBHOOK_EVENTS = validate.OneOf(["started", "progress", "completed"])
STATUSES = ["queued", "running", "canceling", "succeeded", "failed", "canceled", "expired"]
MAX_METADATA_BYTES = 16 * 1024
SEED = validate.Range(0, 2**32 - 1)


class Strict(ma.Schema):
    class Meta:
        unknown = ma.RAISE


# --- auth -----------------------------------------------------------------------------


class TokenRequestSchema(Strict):
    api_key = fields.String(required=True, validate=validate.Length(1, 200))


class TokenSchema(ma.Schema):
    access_token = fields.String()
    token_type = fields.String()
    expires_in = fields.Integer()


class WebhookSecretSchema(ma.Schema):
    secret = fields.String()


# --- job inputs, one schema per kind ---------------------------------------------------


class LimitedInput(Strict):
    """An input schema that also checks the model's registry limits."""

    def __init__(self, limits: dict[str, Any] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.limits = limits or {}

    def _max(self, errors: dict, data: dict, field: str, limit_name: str) -> None:
        limit = self.limits.get(limit_name)
        if limit is not None and field in data and data[field] > limit:
            errors.setdefault(field, []).append(f"must be at most {limit} for this model")

    def _min(self, errors: dict, data: dict, field: str, limit_name: str) -> None:
        limit = self.limits.get(limit_name)
        if limit is not None and field in data and data[field] < limit:
            errors.setdefault(field, []).append(f"must be at least {limit} for this model")


class EchoInputSchema(LimitedInput):
    value = fields.Raw(allow_none=True)
    sleep_s = fields.Float(validate=validate.Range(0, 60))
    fail = fields.Boolean()

    @validates_schema
    def _limits(self, data: dict, **_: Any) -> None:
        errors: dict[str, list[str]] = {}
        self._max(errors, data, "sleep_s", "max_sleep_s")
        if errors:
            raise ValidationError(errors)


def _multiple_of_8(value: int) -> None:
    if value % 8:
        raise ValidationError("must be a multiple of 8")


class ImageInputSchema(LimitedInput):
    prompt = fields.String(required=True, validate=validate.Length(1, 2000))
    negative_prompt = fields.String(validate=validate.Length(0, 2000))
    width = fields.Integer(validate=[validate.Range(8, 4096), _multiple_of_8])
    height = fields.Integer(validate=[validate.Range(8, 4096), _multiple_of_8])
    steps = fields.Integer(validate=validate.Range(1, 150))
    guidance_scale = fields.Float(validate=validate.Range(0, 50))
    seed = fields.Integer(validate=SEED, allow_none=True)
    num_images = fields.Integer(validate=validate.Range(1, 8))

    @validates_schema
    def _limits(self, data: dict, **_: Any) -> None:
        errors: dict[str, list[str]] = {}
        for f in ("width", "height"):
            self._max(errors, data, f, f"max_{f}")
            self._min(errors, data, f, f"min_{f}")
        self._max(errors, data, "steps", "max_steps")
        self._max(errors, data, "num_images", "max_num_images")
        self._max(errors, data, "guidance_scale", "max_guidance_scale")
        if errors:
            raise ValidationError(errors)


class MessageSchema(Strict):
    role = fields.String(required=True, validate=validate.OneOf(["system", "user", "assistant"]))
    content = fields.String(required=True, validate=validate.Length(0, 100_000))


class StopField(fields.Field):
    """A string or a list of up to 4 strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kw: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise ValidationError("must be a non-empty string or a list of them")
        if len(items) > 4:
            raise ValidationError("at most 4 stop sequences")
        return items


class TextInputSchema(LimitedInput):
    prompt = fields.String(validate=validate.Length(1, 100_000))
    messages = fields.List(fields.Nested(MessageSchema), validate=validate.Length(1, 500))
    max_tokens = fields.Integer(validate=validate.Range(1, 1_000_000))
    temperature = fields.Float(validate=validate.Range(0, 2))
    top_p = fields.Float(validate=validate.Range(0, 1, min_inclusive=False))
    seed = fields.Integer(validate=SEED, allow_none=True)
    stop = StopField()
    # Beyond API.md: a floor on generated tokens (benchmarks; random-weight test models
    # would otherwise stop at once).
    min_tokens = fields.Integer(validate=validate.Range(0, 1_000_000))

    @validates_schema
    def _one_prompt(self, data: dict, **_: Any) -> None:
        if ("prompt" in data) == ("messages" in data):
            raise ValidationError("give exactly one of `prompt` or `messages`", "prompt")
        errors: dict[str, list[str]] = {}
        self._max(errors, data, "max_tokens", "max_tokens")
        if data.get("min_tokens", 0) > data.get(
            "max_tokens", self.limits.get("max_tokens", 0) or 0
        ):
            errors.setdefault("min_tokens", []).append("must not exceed max_tokens")
        limit = self.limits.get("max_prompt_chars")
        if limit and len(data.get("prompt") or "") > limit:
            errors.setdefault("prompt", []).append(f"must be at most {limit} characters")
        if errors:
            raise ValidationError(errors)


INPUT_SCHEMAS: dict[str, type[LimitedInput]] = {
    "echo": EchoInputSchema,
    "image.generate": ImageInputSchema,
    "text.generate": TextInputSchema,
}


# One input schema instance per model: building a schema costs more than loading with
# it, and a batch loads tens of thousands of inputs. Loading keeps no state on it.
_input_schemas: dict[tuple[str, str], tuple[ModelSpec, LimitedInput]] = {}


def input_schema(spec: ModelSpec) -> LimitedInput:
    cached = _input_schemas.get((spec.name, spec.kind))
    if cached is None or cached[0] is not spec:  # the registry was reloaded
        cached = (spec, INPUT_SCHEMAS[spec.kind](spec.effective_limits))
        _input_schemas[(spec.name, spec.kind)] = cached
    return cached[1]


def load_input(spec: ModelSpec, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValidationError({"input": ["must be an object"]})
    try:
        return input_schema(spec).load(raw)
    except ValidationError as exc:
        raise ValidationError({"input": exc.messages}) from exc


# --- job requests ---------------------------------------------------------------------


def no_nul(value: str) -> None:
    """For strings stored in text columns: PostgreSQL's text cannot hold U+0000."""
    if "\x00" in value:
        raise ValidationError("must not contain NUL characters (\\u0000)")


class JobCreateSchema(Strict):
    kind = fields.String(required=True, validate=validate.OneOf(list(INPUT_SCHEMAS)))
    model = fields.String(required=True, validate=validate.Length(1, 200))
    input = fields.Dict(required=True, metadata={"description": "kind-specific input (API.md)"})
    priority = fields.String(validate=PRIORITY)
    webhook = fields.Url(
        schemes={"http", "https"},
        require_tld=False,
        validate=[validate.Length(max=2000), validate_webhook_url],
    )
    webhook_events = fields.List(
        fields.String(validate=WEBHOOK_EVENTS), validate=validate.Length(1, 3)
    )
    ttl_s = fields.Integer(validate=validate.Range(1, 30 * 86400))
    timeout_s = fields.Integer(validate=validate.Range(1, 7 * 86400))
    metadata = fields.Dict()

    @validates_schema
    def _metadata_size(self, data: dict, **_: Any) -> None:
        if "metadata" in data and len(json.dumps(data["metadata"])) > MAX_METADATA_BYTES:
            raise ValidationError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON", "metadata")

    @post_load
    def _model_input(self, data: dict, **_: Any) -> dict:
        spec = registry.get(data["model"])
        if spec is None:
            raise ValidationError(
                {"model": [f"unknown model {data['model']!r}; see GET /v1/models"]}
            )
        if spec.kind != data["kind"]:
            raise ValidationError({"kind": [f"model {spec.name!r} runs {spec.kind} jobs"]})
        data["input"] = load_input(spec, data["input"])
        return data


class JobListQuerySchema(Strict):
    status = fields.String(validate=validate.OneOf(STATUSES))
    kind = fields.String()
    model = fields.String()
    batch_id = fields.String()
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 500))
    cursor = fields.String()
    all = fields.Boolean(load_default=False, metadata={"description": "admins: every user's jobs"})


class WaitQuerySchema(Strict):
    wait = fields.Float(load_default=0, validate=validate.Range(0, 60))


class ErrorObject(ma.Schema):
    code = fields.String()
    message = fields.String()


class ProgressSchema(ma.Schema):
    current = fields.Integer()
    total = fields.Integer()
    fraction = fields.Float()


class UrlsSchema(ma.Schema):
    self = fields.String()
    result = fields.String()
    cancel = fields.String()
    events = fields.String()


class JobSchema(ma.Schema):
    id = fields.String()
    kind = fields.String()
    model = fields.String()
    status = fields.String()
    priority = fields.String()
    input = fields.Dict()
    output = fields.Raw(allow_none=True)
    error = fields.Nested(ErrorObject, allow_none=True)
    progress = fields.Nested(ProgressSchema, allow_none=True)
    queue_position = fields.Integer(allow_none=True)
    attempts = fields.Integer()
    created_at = fields.String()
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    batch_id = fields.String(allow_none=True)
    custom_id = fields.String(allow_none=True)
    retry_of = fields.String(allow_none=True)
    metadata = fields.Raw(allow_none=True)
    webhook = fields.String(allow_none=True)
    webhook_events = fields.List(fields.String(), allow_none=True)
    ttl_s = fields.Integer(allow_none=True)
    timeout_s = fields.Integer()
    urls = fields.Nested(UrlsSchema)


class JobPageSchema(ma.Schema):
    data = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True)


class ResultSchema(ma.Schema):
    id = fields.String()
    status = fields.String()
    progress = fields.Nested(ProgressSchema, allow_none=True)
    output = fields.Raw(allow_none=True)
    error = fields.Nested(ErrorObject, allow_none=True)


class ModelSchema(ma.Schema):
    name = fields.String()
    kind = fields.String()
    queue = fields.String()
    workers_online = fields.Integer()
    queued = fields.Integer()
    limits = fields.Dict()
