"""ConfigError and the translation of validation failures into Kong's wording.

A `Problem` is one failure: which entity (its place in the file and its input), which field
inside it, and the message. Messages name both, e.g.
"services[0] (name 'billing') > routes[1] > paths[0]: invalid regex: ...".
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from ringgate.config.schema import FieldPath, is_uuid

# Document order of the collections, used to report problems top to bottom.
COLLECTION_ORDER: Final = (
    "services", "routes", "upstreams", "targets", "plugins",
    "consumers", "certificates", "ca_certificates", "snis",
)  # fmt: skip
_COLLECTION_RANK: Final = {name: rank for rank, name in enumerate(COLLECTION_ORDER)}

# pydantic error type -> Kong's message for the same failure.
_KONG_MESSAGES: Final = {
    "missing": "required field missing",
    "extra_forbidden": "unknown field",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected a boolean",
    "bool_parsing": "expected a boolean",
    "list_type": "expected an array",
    "tuple_type": "expected an array",
    "set_type": "expected an array",
    "dict_type": "expected a map",
    "mapping_type": "expected a map",
    "model_type": "expected a record",
    "model_attributes_type": "expected a record",
    "none_required": "value must be null",
}


@dataclass(frozen=True, slots=True)
class Level:
    """One step of an entity's place in the file: `routes[1]`, labelled "name 'r1'" when it has one."""

    collection: str
    index: int
    label: str | None = None

    def render(self) -> str:
        text = f"{self.collection}[{self.index}]"
        return f"{text} ({self.label})" if self.label else text


@dataclass(eq=False, slots=True)
class EntityRef:
    """An entity as written: its place, and its input (nested children removed, parent FK added)."""

    entity_type: str  # the collection name, e.g. "services"
    levels: tuple[Level, ...]
    raw: Any
    id: str | None = None

    def render(self) -> str:
        return " > ".join(level.render() for level in self.levels)

    def sort_key(self) -> tuple[tuple[int, int], ...]:
        return tuple(
            (_COLLECTION_RANK.get(level.collection, len(_COLLECTION_RANK)), level.index) for level in self.levels
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """One failure. `entity` None means the document itself; an empty `field` means the whole entity."""

    message: str
    entity: EntityRef | None = None
    field: FieldPath = field(default=())

    def render(self) -> str:
        place = [self.entity.render()] if self.entity is not None else []
        if self.field:
            place.append(render_field(self.field))
        return f"{' > '.join(place)}: {self.message}" if place else self.message

    def sort_key(self) -> tuple[tuple[tuple[int, int], ...]]:
        return (self.entity.sort_key() if self.entity is not None else (),)


def render_field(path: FieldPath) -> str:
    """("paths", 0) -> "paths[0]"; ("healthchecks", "active", "timeout") -> "healthchecks.active.timeout"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _kong_field(path: FieldPath) -> str:
    # Kong's flattened errors name fields by their Lua error-table path: dots, 1-based indexes.
    return ".".join(str(part + 1) if isinstance(part, int) else str(part) for part in path)


def _singular(noun: str) -> str:
    return noun[:-1] if noun.endswith("s") else noun


class ConfigError(Exception):
    """An invalid declarative config: every problem found, each naming its entity and field."""

    source: str
    messages: list[str]
    problems: tuple[Problem, ...]

    def __init__(self, source: str, messages: Iterable[str] = (), *, problems: Iterable[Problem] = ()) -> None:
        self.source = source
        self.problems = tuple(problems)
        self.messages = [*messages, *(problem.render() for problem in self.problems)]
        super().__init__(source, self.messages)

    def __str__(self) -> str:
        return f"{self.source}: invalid declarative config:\n  " + "\n  ".join(self.messages)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, list[str]]]:
        # Pickled across processes as text only; the entity inputs stay behind.
        return (ConfigError, (self.source, self.messages))

    def flattened(self) -> list[dict[str, Any]]:
        """Kong's `flattened_errors`: one entry per invalid entity.

        Each entry: entity_type (singular), entity_name, entity_id, entity_tags, entity (the input,
        nested children removed, parent reference as {"id": ...}) and errors, each
        {"type": "field", "field": "paths.1", "message": ...} or {"type": "entity", "message": ...}.
        Field paths use Kong's form (dots, indexes from 1). Problems of the document itself
        (format version, unknown top-level keys, syntax) have no entity; they are only in `messages`.
        """
        entries: dict[int, dict[str, Any]] = {}
        for problem in self.problems:
            entity = problem.entity
            if entity is None or not isinstance(entity.raw, dict):
                continue
            entry = entries.get(id(entity))
            if entry is None:
                raw = entity.raw
                name = raw.get("name")
                tags = raw.get("tags")
                entry = {
                    "entity_type": _singular(entity.entity_type),
                    "entity_name": name if isinstance(name, str) and name else None,
                    "entity_id": entity.id if isinstance(entity.id, str) and is_uuid(entity.id) else None,
                    "entity_tags": tags if isinstance(tags, list) and all(isinstance(t, str) for t in tags) else None,
                    "entity": copy.deepcopy(raw),
                    "errors": [],
                }
                entries[id(entity)] = entry
            if problem.field:
                entry["errors"].append(
                    {"type": "field", "field": _kong_field(problem.field), "message": problem.message}
                )
            else:
                entry["errors"].append({"type": "entity", "message": problem.message})
        return list(entries.values())


def problems_from_validation_error(error: ValidationError, entity: EntityRef, prefix: FieldPath = ()) -> list[Problem]:
    """Translate pydantic's errors for one entity into Problems with Kong's messages."""
    problems: list[Problem] = []
    for detail in error.errors(include_url=False):
        # Dict-key failures carry a "[key]" marker after the key itself; the key is enough.
        location = prefix + tuple(part for part in detail["loc"] if part != "[key]")
        kind = detail["type"]
        context = detail.get("ctx") or {}
        if kind == "entity_checks":
            for path, message in context["problems"]:
                problems.append(Problem(message, entity, location + tuple(path)))
        elif kind == "kong":
            problems.append(Problem(str(context["reason"]), entity, location))
        else:
            problems.append(Problem(_KONG_MESSAGES.get(kind, detail["msg"]), entity, location))
    return problems
