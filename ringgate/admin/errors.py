"""Kong's Admin API error answers: codes, names, message texts and `fields` shapes (kong-spec §6).

Every failure a handler can report is an `AdminError` carrying the HTTP status and the JSON body,
so handlers raise and the app turns the exception into the answer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

from ringgate.config.errors import ConfigError

# Kong's error codes (kong/db/errors.lua) and the name each one is answered with.
INVALID_PRIMARY_KEY: Final = 1
SCHEMA_VIOLATION: Final = 2
PRIMARY_KEY_VIOLATION: Final = 3
FOREIGN_KEY_VIOLATION: Final = 4
UNIQUE_VIOLATION: Final = 5
INVALID_OFFSET: Final = 7
INVALID_SIZE: Final = 9
DECLARATIVE_CONFIG: Final = 14
REFERENCED_BY_OTHERS: Final = 19

CODE_NAMES: Final = {
    INVALID_PRIMARY_KEY: "invalid primary key",
    SCHEMA_VIOLATION: "schema violation",
    PRIMARY_KEY_VIOLATION: "primary key violation",
    FOREIGN_KEY_VIOLATION: "foreign key violation",
    UNIQUE_VIOLATION: "unique constraint violation",
    INVALID_OFFSET: "invalid offset",
    INVALID_SIZE: "invalid size",
    DECLARATIVE_CONFIG: "invalid declarative configuration",
    REFERENCED_BY_OTHERS: "referenced by others",
}

# Where an error is about the entity as a whole rather than one field (Kong's key).
ENTITY_KEY: Final = "@entity"


class AdminError(Exception):
    """An answer other than success: HTTP status and the JSON body to send."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body.get("message"))
        self.status = status
        self.body = body


def message_error(status: int, message: str) -> AdminError:
    return AdminError(status, {"message": message})


def not_found() -> AdminError:
    return message_error(404, "Not found")


def method_not_allowed() -> AdminError:
    return message_error(405, "Method not allowed")


def unauthorized() -> AdminError:
    return message_error(401, "Unauthorized")


def _coded(status: int, code: int, message: str, fields: Any = None) -> AdminError:
    body: dict[str, Any] = {"code": code, "name": CODE_NAMES[code], "message": message}
    if fields is not None:
        body["fields"] = fields
    return AdminError(status, body)


def schema_violation(fields: dict[str, Any]) -> AdminError:
    """400 code 2; the message lists every error as Kong's errors:schema_violation does."""
    lines = list(fields.get(ENTITY_KEY, ()))
    for name in sorted(key for key in fields if key != ENTITY_KEY):
        value = fields[name]
        if isinstance(value, (dict, list)):
            for sub_key, sub_value in _sorted_items(value):
                text = sub_value if isinstance(sub_value, str) else lua_pretty(sub_value)
                lines.append(f"{name}.{sub_key}: {text}")
        else:
            lines.append(f"{name}: {value}")
    if len(lines) == 1:
        message = f"schema violation ({lines[0]})"
    else:
        message = f"{len(lines)} schema violations ({'; '.join(lines)})"
    return _coded(400, SCHEMA_VIOLATION, message, fields)


def unique_violation(key: dict[str, Any]) -> AdminError:
    return _coded(409, UNIQUE_VIOLATION, f"UNIQUE violation detected on '{lua_pretty(key)}'", key)


def primary_key_violation(entity_id: str) -> AdminError:
    key = {"id": entity_id}
    return _coded(400, PRIMARY_KEY_VIOLATION, f"primary key violation on key '{lua_pretty(key)}'", key)


def foreign_key_invalid(field_name: str, key: dict[str, Any], collection: str) -> AdminError:
    message = f"the foreign key '{lua_pretty(key)}' does not reference an existing '{collection}' entity."
    return _coded(400, FOREIGN_KEY_VIOLATION, message, {field_name: key})


def foreign_key_restricted(parent: str, child: str) -> AdminError:
    message = f"an existing '{child}' entity references this '{parent}' entity"
    return _coded(400, FOREIGN_KEY_VIOLATION, message, {"@referenced_by": child})


def referenced_by_others(message: str) -> AdminError:
    """400 code 19: an entity still in use where Kong checks by hand (a CA certificate a service trusts)."""
    return _coded(400, REFERENCED_BY_OTHERS, message)


def invalid_size(reason: str) -> AdminError:
    return _coded(400, INVALID_SIZE, reason)


def invalid_offset(offset: str, reason: str) -> AdminError:
    return _coded(400, INVALID_OFFSET, f"'{offset}' is not a valid offset: {reason}")


# --------------------------------------------------------------------------------------------
# ConfigError -> Kong's `fields`
# --------------------------------------------------------------------------------------------


def entity_fields(error: ConfigError, collection: str, index: int) -> dict[str, Any]:
    """Kong's `fields` for one written entity: the problems of entry `collection[index]`.

    A problem elsewhere in the document (not expected: the rest was valid before the write)
    is kept as an entity-level message with its place, never dropped.
    """
    tree: dict[Any, Any] = {}
    for problem in error.problems:
        own = problem.entity is not None and [(level.collection, level.index) for level in problem.entity.levels] == [
            (collection, index)
        ]
        if own and problem.field:
            _place(tree, problem.field, problem.message)
        else:
            _add_entity_message(tree, problem.message if own else problem.render())
    plain = error.messages[: len(error.messages) - len(error.problems)]
    for message in plain:
        _add_entity_message(tree, message)
    return _finish(tree)


def declarative_fields(error: ConfigError) -> dict[str, Any]:
    """Kong's nested `fields` for an invalid declarative config: collections, entries, fields."""
    tree: dict[Any, Any] = {}
    for problem in error.problems:
        path: list[str | int] = []
        if problem.entity is not None:
            for level in problem.entity.levels:
                path += [level.collection, level.index]
        path += list(problem.field)
        if problem.field or not path:
            if path:
                _place(tree, tuple(path), problem.message)
            else:
                _add_entity_message(tree, problem.message)
        else:
            node = _descend(tree, tuple(path))
            node.setdefault(ENTITY_KEY, []).append(problem.message)
    return _finish(tree)


def declarative_invalid(error: ConfigError, flatten: bool) -> AdminError:
    plain = error.messages[: len(error.messages) - len(error.problems)]
    fields = declarative_fields(error)
    if error.problems or not plain:
        message = f"declarative config is invalid: {lua_pretty(fields)}"
    else:
        # Nothing but document-level text (a syntax error, a wrong top-level type).
        message = "failed parsing declarative configuration: " + "; ".join(plain)
        fields = {ENTITY_KEY: plain}
    body: dict[str, Any] = {"code": DECLARATIVE_CONFIG, "name": CODE_NAMES[DECLARATIVE_CONFIG],
                            "message": message, "fields": fields}
    if flatten:
        body["flattened_errors"] = error.flattened()
    return AdminError(400, body)


def _descend(tree: dict[Any, Any], path: tuple[str | int, ...]) -> dict[Any, Any]:
    node = tree
    for part in path:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    return node


def _place(tree: dict[Any, Any], path: tuple[str | int, ...], message: str) -> None:
    parent = _descend(tree, path[:-1])
    parent.setdefault(path[-1], message)  # Kong keeps one message per field


def _add_entity_message(tree: dict[Any, Any], message: str) -> None:
    tree.setdefault(ENTITY_KEY, []).append(message)


def _finish(node: Any) -> Any:
    """Int-keyed levels become JSON arrays (Lua's sequences), holes as null."""
    if isinstance(node, list):
        return node
    if not isinstance(node, dict):
        return node
    if node and all(isinstance(key, int) for key in node):
        size = max(node) + 1
        return [_finish(node[i]) if i in node else None for i in range(size)]
    return {str(key): _finish(value) for key, value in node.items()}


def _sorted_items(value: dict[Any, Any] | list[Any]) -> Iterable[tuple[Any, Any]]:
    if isinstance(value, list):
        return [(index + 1, item) for index, item in enumerate(value) if item is not None]
    return sorted(value.items(), key=lambda item: str(item[0]))


_LUA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def lua_pretty(value: Any) -> str:
    """A compact Lua table literal, as Kong's messages show keys (penlight's pretty.write(t, ""))."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "{" + ",".join(lua_pretty(item) for item in value) + "}"
    if isinstance(value, dict):
        parts = []
        for key in sorted(value, key=str):
            text = str(key)
            name = text if _LUA_NAME.fullmatch(text) else f"[{lua_pretty(key)}]"
            parts.append(f"{name}={lua_pretty(value[key])}")
        return "{" + ",".join(parts) + "}"
    return lua_pretty(str(value))


__all__ = [
    "AdminError",
    "declarative_fields",
    "declarative_invalid",
    "entity_fields",
    "foreign_key_invalid",
    "foreign_key_restricted",
    "invalid_offset",
    "invalid_size",
    "lua_pretty",
    "message_error",
    "method_not_allowed",
    "not_found",
    "primary_key_violation",
    "referenced_by_others",
    "schema_violation",
    "unauthorized",
    "unique_violation",
]
