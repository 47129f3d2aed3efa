"""Request bodies as Kong's Admin API reads them: JSON, or form-encoded with Kong's key syntax.

Form keys (what `curl -d` sends in Kong's docs):
  name=example                    a plain field
  hosts[]=a.com&hosts[]=b.com     append to an array
  paths[1]=/a&paths[2]=/b         array element by 1-based index
  config.minute=5                 nested record (also config[minute]=5)
  hosts=a.com                     a single value for an array field becomes a one-element array

Form values are text; `coerce` turns them into the types of the entity's schema (the models
are strict, so "5" would not pass as an integer), exactly as Kong infers form arguments.
JSON bodies are taken as they are.
"""
from __future__ import annotations

import re
import types
import typing
from typing import Any, Final, Union
from urllib.parse import parse_qsl

import orjson
from pydantic import BaseModel

from ringgate.admin.errors import message_error

_APPEND: Final = object()  # the "[]" key part
_HEAD_RE = re.compile(r"[^.\[]+")
_PART_RE = re.compile(r"\[([^\]]*)\]|\.([^.\[]+)")
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class _Array(dict):  # type: ignore[type-arg]
    """An array being filled by index or append; becomes a list once the form is read."""

    def next_index(self) -> int:
        return max(self, default=0) + 1


def decode_body(content_type: str | None, body: bytes) -> tuple[dict[str, Any], bool]:
    """The body as a mapping, and whether it was a form (whose values still need `coerce`)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if not body.strip():
        return {}, kind == "application/x-www-form-urlencoded"
    if kind == "application/json" or kind.endswith("+json") or (not kind and body.lstrip()[:1] == b"{"):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise message_error(400, "Cannot parse JSON body") from None
        if not isinstance(data, dict):
            raise message_error(400, "Cannot parse JSON body: expected an object")
        return data, False
    if kind in ("", "application/x-www-form-urlencoded"):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise message_error(400, "Cannot parse form body: not valid UTF-8") from None
        return decode_form(text), True
    raise message_error(415, f"Unsupported Content-Type '{kind}' (send JSON or form-encoded data)")


def decode_form(text: str) -> dict[str, Any]:
    """Parse form text with Kong's key syntax into a tree of strings, lists and mappings."""
    tree: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        _insert(tree, _split_key(key), value, key)
    return _finish(tree)


def _split_key(key: str) -> list[Any]:
    head = _HEAD_RE.match(key)
    if head is None:
        return [key]
    parts: list[Any] = [head.group()]
    position = head.end()
    while position < len(key):
        part = _PART_RE.match(key, position)
        if part is None:
            return [key]  # not Kong's syntax: keep the whole key as one field name
        bracket, dotted = part.group(1), part.group(2)
        if dotted is not None:
            parts.append(dotted)
        elif bracket == "":
            parts.append(_APPEND)
        elif bracket.isdigit():
            parts.append(int(bracket))
        else:
            parts.append(bracket)
        position = part.end()
    return parts


def _insert(node: dict[Any, Any], parts: list[Any], value: str, key: str) -> None:
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if isinstance(node, _Array):
            if isinstance(part, str):
                raise message_error(400, f"invalid form key '{key}': mixes array and record parts")
            part = node.next_index() if part is _APPEND else part
        elif not isinstance(part, str):
            raise message_error(400, f"invalid form key '{key}': an index needs an array field")
        if last:
            existing = node.get(part)
            if part not in node:
                node[part] = value
            elif isinstance(existing, _Array):
                existing[existing.next_index()] = value
            elif isinstance(existing, str):
                node[part] = _Array({1: existing, 2: value})  # a repeated plain key: an array
            else:
                raise message_error(400, f"invalid form key '{key}': given both as a value and a record")
            return
        child = node.get(part)
        wants_array = not isinstance(parts[index + 1], str)
        if child is None:
            child = _Array() if wants_array else {}
            node[part] = child
        elif isinstance(child, str):
            if not wants_array:
                raise message_error(400, f"invalid form key '{key}': given both as a value and a record")
            child = _Array({1: child})
            node[part] = child
        node = child


def _finish(node: Any) -> Any:
    if isinstance(node, _Array):
        return [_finish(node[index]) for index in sorted(node)]
    if isinstance(node, dict):
        return {key: _finish(value) for key, value in node.items()}
    return node


# --------------------------------------------------------------------------------------------
# Coercion by schema
# --------------------------------------------------------------------------------------------


def coerce(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Form text -> the types `model` declares; unknown fields are left for the schema to report."""
    fields = model.model_fields
    return {name: _coerce(fields[name].annotation, value) if name in fields else value
            for name, value in data.items()}


def _coerce(annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _coerce(typing.get_args(annotation)[0], value)
    if origin is Union or origin is types.UnionType:
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if value == "":
            return None  # Kong: an empty form value means null
        return _coerce(options[0], value) if len(options) == 1 else value
    if origin in (tuple, list, set, frozenset):
        inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else Any
        items = value if isinstance(value, list) else [value]
        return [_coerce(inner, item) for item in items]
    if origin is dict:
        args = typing.get_args(annotation)
        if isinstance(value, dict) and len(args) == 2:
            return {key: _coerce(args[1], item) for key, item in value.items()}
        return value
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return coerce(annotation, value) if isinstance(value, dict) else value
    if not isinstance(value, str):
        return value
    if annotation is bool:
        return {"true": True, "false": False}.get(value.lower(), value)
    if annotation is int and _INT_RE.fullmatch(value):
        return int(value)
    if annotation is float and _FLOAT_RE.fullmatch(value):
        number = float(value)
        return int(number) if number.is_integer() and _INT_RE.fullmatch(value) else number
    return value
