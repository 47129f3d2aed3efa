"""POST /config (replace the whole config with a declarative one) and GET /config (export it).

POST takes the config as the body (JSON, or YAML text), as `{"config": "<yaml or json>"}`, or as
a form field `config=`. It is validated before anything changes: an invalid one is answered
400 code 14 with Kong's nested `fields` (and `flattened_errors` with ?flatten_errors=1) and the
running config stays. ?check_hash=1 answers 304 when the new config is the running one.
"""
from __future__ import annotations

from typing import Any

import orjson
import yaml

from ringgate.admin import entities, errors
from ringgate.admin.api import AdminContext, Request, Response
from ringgate.admin.forms import decode_form
from ringgate.admin.state import Snapshot
from ringgate.config import Config, ConfigError, load_dict, load_text
from ringgate.config.declarative import ENTITY_COLLECTIONS

SOURCE = "POST /config"
_YAML_TYPES = ("", "text/yaml", "text/x-yaml", "application/yaml", "application/x-yaml", "text/plain")


def export(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
    document = context.state.snapshot.document
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return Response(200, {"config": text})


def replace(context: AdminContext, request: Request, params: dict[str, str]) -> Response:
    try:
        config = _parse(request)
    except ConfigError as exc:
        raise errors.declarative_invalid(exc, flatten=request.flag("flatten_errors")) from None
    check_hash = request.flag("check_hash")

    def build(current: Snapshot) -> tuple[Config | None, bool]:
        unchanged = config.config_hash == current.config.config_hash
        return (None if unchanged else config), unchanged

    snapshot, unchanged = context.state.commit(build)
    if unchanged and check_hash:
        return Response(304)
    return Response(201, loaded_entities(snapshot.document))


def loaded_entities(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Kong's answer to POST /config: each collection as a map from id to entity."""
    answer: dict[str, dict[str, Any]] = {}
    for collection in ENTITY_COLLECTIONS:
        kind = entities.KINDS.get(collection)
        items = entities.entries(document, collection)
        if items:
            answer[collection] = {item["id"]: entities.present(kind, item) if kind else item for item in items}
    return answer


def _parse(request: Request) -> Config:
    content_type = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    body = request.body
    if content_type == "application/x-www-form-urlencoded":
        config = decode_form(_text(body)).get("config")
        if not isinstance(config, str):
            raise ConfigError(SOURCE, ["expected the declarative config in the form field 'config'"])
        return load_text(config, SOURCE)
    if content_type == "application/json" or content_type.endswith("+json"):
        return _from_value(_json(_text(body)))
    if content_type in _YAML_TYPES:
        text = _text(body)
        if content_type == "" and text.lstrip().startswith("{"):
            return _from_value(_json(text))
        return load_text(text, SOURCE)
    raise errors.message_error(415, f"Unsupported Content-Type '{content_type}' (send YAML, JSON or a form)")


def _from_value(data: Any) -> Config:
    """A parsed JSON body: the config itself, or {"config": <text or mapping>}."""
    if isinstance(data, dict) and "config" in data and "_format_version" not in data:
        inner = data["config"]
        if isinstance(inner, str):
            return load_text(inner, SOURCE)
        data = inner
    if not isinstance(data, dict):
        found = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(SOURCE, [f"expected a mapping at the top level, got {found}"])
    return load_dict(data, SOURCE)


def _json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(SOURCE, [f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"]) \
            from None


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(SOURCE, [f"the body is not valid UTF-8 (byte {exc.start})"]) from None
