"""Load a Kong declarative config (kong.yml / JSON) into an immutable, hashed `Config` snapshot.

Steps, each gathering every problem before the next decides anything:
1. parse (YAML or JSON) and check the document's own keys;
2. walk the collections, lifting nested children (services[].routes[], ...) out of their parents;
3. give every entity a stable id (Kong's UUIDv5 scheme), then resolve references by name or id;
4. validate each entity with its schema model, then check uniqueness across entities.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from ringgate.config.errors import ConfigError, EntityRef, Level, Problem, problems_from_validation_error
from ringgate.config.schema import (
    CANONICAL_FORMAT_VERSION,
    FORMAT_VERSIONS,
    LEGACY_FORMAT_VERSIONS,
    CACertificate,
    Certificate,
    Entity,
    FieldPath,
    Plugin,
    Route,
    ServerName,
    Service,
    Target,
    Upstream,
    migrate_legacy_path,
    plugin_config_model,
)

try:
    _YamlLoader: type = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _YamlLoader = yaml.SafeLoader

ENTITY_COLLECTIONS: Final = (
    "services", "routes", "upstreams", "targets", "plugins", "certificates", "ca_certificates", "snis",
)  # fmt: skip
# Left out of to_dict when empty, so configs without them keep the hash they had before TLS.
_OPTIONAL_COLLECTIONS: Final = ("certificates", "ca_certificates", "snis")
# Accepted and kept (in to_dict and the hash) but not interpreted yet.
OPAQUE_COLLECTIONS: Final = ("consumers",)
_META_TYPES: Final = {
    "_transform": (bool, "expected a boolean"),
    "_comment": (str, "expected a string"),
    "_workspace": (str, "expected a string"),
}

_MODELS: Final[dict[str, type[Entity]]] = {
    "services": Service, "routes": Route, "upstreams": Upstream, "targets": Target, "plugins": Plugin,
    "certificates": Certificate, "ca_certificates": CACertificate, "snis": ServerName,
}  # fmt: skip
# Children that may be nested under a parent, and the parent's FK field they get.
_CHILDREN: Final = {
    "services": ("routes", "plugins"), "routes": ("plugins",), "upstreams": ("targets",), "certificates": ("snis",),
}  # fmt: skip
_PARENT_FIELD: Final = {"services": "service", "routes": "route", "upstreams": "upstream", "certificates": "certificate"}
# Foreign fields a top-level entry names by endpoint key (name) or id.
_REFERENCES: Final = {
    "services": (("client_certificate", "certificates"),),
    "routes": (("service", "services"),),
    "plugins": (("service", "services"), ("route", "routes")),
    "targets": (("upstream", "upstreams"),),
    "upstreams": (("client_certificate", "certificates"),),
    "snis": (("certificate", "certificates"),),
}
_NAMED: Final = ("services", "routes", "upstreams", "snis")

# Kong's namespace for declarative ids: uuid5(uuid5(this, entity type), endpoint key).
_KONG_ID_NAMESPACE: Final = uuid.UUID("fd02801f-0957-4a15-a55a-c8d9606f30b5")
_TYPE_NAMESPACES: Final = {name: uuid.uuid5(_KONG_ID_NAMESPACE, name) for name in ENTITY_COLLECTIONS}

_M = TypeVar("_M", bound=Entity)


# --------------------------------------------------------------------------------------------
# The snapshot
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Config:
    """An immutable, validated config. Entities are frozen models; dict fields are not to be mutated."""

    format_version: str
    services: tuple[Service, ...]
    routes: tuple[Route, ...]
    upstreams: tuple[Upstream, ...]
    plugins: tuple[Plugin, ...]
    consumers: tuple[dict[str, Any], ...] = ()
    certificates: tuple[Certificate, ...] = ()
    ca_certificates: tuple[CACertificate, ...] = ()
    snis: tuple[ServerName, ...] = ()
    config_hash: str = field(init=False)
    _services_by_id: dict[str, Service] = field(init=False, repr=False)
    _upstreams_by_name: dict[str, Upstream] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_services_by_id", {service.id: service for service in self.services})
        object.__setattr__(self, "_upstreams_by_name", {upstream.name: upstream for upstream in self.upstreams})
        canonical = orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        # md5 as Kong's configuration_hash: a change detector, not a security boundary.
        object.__setattr__(self, "config_hash", hashlib.md5(canonical).hexdigest())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and other.config_hash == self.config_hash

    def __hash__(self) -> int:
        return hash(self.config_hash)

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(target for upstream in self.upstreams for target in upstream.targets)

    def service(self, service_id: str) -> Service:
        """The service with this id; KeyError if there is none."""
        return self._services_by_id[service_id]

    def upstream_by_name(self, name: str) -> Upstream | None:
        return self._upstreams_by_name.get(name)

    def to_dict(self) -> dict[str, Any]:
        """Canonical declarative form: format 3.0, top-level collections, every id and default."""
        document: dict[str, Any] = {
            "_format_version": CANONICAL_FORMAT_VERSION,
            "services": [service.model_dump(mode="json") for service in self.services],
            "routes": [route.model_dump(mode="json") for route in self.routes],
            "upstreams": [upstream.model_dump(mode="json") for upstream in self.upstreams],
            "targets": [target.model_dump(mode="json") for target in self.targets],
            "plugins": [plugin.model_dump(mode="json") for plugin in self.plugins],
        }
        for name in _OPTIONAL_COLLECTIONS:
            models: tuple[Entity, ...] = getattr(self, name)
            if models:
                document[name] = [model.model_dump(mode="json") for model in models]
        for name in OPAQUE_COLLECTIONS:
            entries = getattr(self, name)
            if entries:
                document[name] = [_copy_tree(entry) for entry in entries]
        return document


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------


def load_file(path: str) -> Config:
    """Load a YAML or JSON file (JSON when the name ends in .json or the text starts with "{")."""
    try:
        with open(path, "rb") as stream:
            blob = stream.read()
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"the file is not valid UTF-8 (byte {exc.start})"]) from None
    return _load_text(text, path, as_json=path.lower().endswith(".json"))


def load_text(text: str, source: str = "<config>") -> Config:
    """Load YAML or JSON text (JSON when it starts with "{")."""
    return _load_text(text, source, as_json=False)


def load_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Load an already parsed document. The input is copied, never kept or changed."""
    return _Loader(source).load(_copy_tree(data))


def _load_text(text: str, source: str, as_json: bool) -> Config:
    text = text.removeprefix("\ufeff")
    if as_json or text.lstrip().startswith("{"):
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(
                source, [f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
            ) from None
    else:
        try:
            data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a safe loader
        except yaml.YAMLError as exc:
            raise ConfigError(source, [_describe_yaml_error(exc)]) from None
    return _Loader(source).load(data)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"YAML error: {exc}"
    problem = getattr(exc, "problem", None) or "invalid YAML"
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"YAML syntax error at {where}: {problem}" + (f" ({context})" if context else "")


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Entry:
    """One entity on its way from input to model."""

    collection: str
    ref: EntityRef
    data: dict[str, Any]
    parent: _Entry | None
    model: Entity | None = None
    broken_fields: set[str] = field(default_factory=set)  # reference problems already reported
    duplicate: bool = False  # a uniqueness problem already reported

    @property
    def id(self) -> str:
        assert self.ref.id is not None
        return self.ref.id


class _Loader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.entries: dict[str, list[_Entry]] = {name: [] for name in ENTITY_COLLECTIONS}
        self.opaque: dict[str, tuple[dict[str, Any], ...]] = {}

    def fail(self, message: str, entity: EntityRef | None = None, field_path: FieldPath = ()) -> None:
        self.problems.append(Problem(message, entity, field_path))

    def load(self, document: Any) -> Config:
        if not isinstance(document, dict):
            found = "nothing" if document is None else f"a {type(document).__name__}"
            raise ConfigError(self.source, [f"expected a mapping at the top level, got {found}"])
        version = self._check_document(document)
        for name in ENTITY_COLLECTIONS:
            for index, item in enumerate(self._items(document.get(name), None, (name,))):
                self._collect(name, index, item, None, ())
        for name in OPAQUE_COLLECTIONS:
            self.opaque[name] = self._opaque(name, document.get(name))
        if version in LEGACY_FORMAT_VERSIONS:
            self._migrate_paths()
        self._assign_ids(("services", "upstreams", "routes", "certificates", "ca_certificates", "snis"))
        self._resolve_references()
        self._label_certificates()
        self._assign_ids(("targets", "plugins"))
        self._validate()
        self._check_uniqueness()
        if self.problems:
            self.problems.sort(key=Problem.sort_key)
            raise ConfigError(self.source, problems=self.problems)
        return self._snapshot(version)

    # -- structure ---------------------------------------------------------------------------

    def _check_document(self, document: dict[Any, Any]) -> str:
        version = document.get("_format_version")
        if version is None:
            self.fail("required field missing", field_path=("_format_version",))
        elif version not in FORMAT_VERSIONS:
            self.fail("expected one of: " + ", ".join(FORMAT_VERSIONS), field_path=("_format_version",))
        for key, value in document.items():
            if key in _META_TYPES:
                expected_type, message = _META_TYPES[key]
                if not isinstance(value, expected_type):
                    self.fail(message, field_path=(key,))
            elif key != "_format_version" and key not in ENTITY_COLLECTIONS and key not in OPAQUE_COLLECTIONS:
                self.fail("unknown field", field_path=(str(key),))
        return version if version in FORMAT_VERSIONS else CANONICAL_FORMAT_VERSION

    def _items(self, value: Any, owner: EntityRef | None, field_path: FieldPath) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail("expected an array", owner, field_path)
            return []
        return value

    def _opaque(self, name: str, value: Any) -> tuple[dict[str, Any], ...]:
        kept = []
        for index, item in enumerate(self._items(value, None, (name,))):
            if isinstance(item, dict):
                kept.append(item)
            else:
                self.fail("expected a record", EntityRef(name, (Level(name, index),), item))
        return tuple(kept)

    def _collect(self, collection: str, index: int, item: Any, parent: _Entry | None, above: tuple[Level, ...]) -> None:
        if collection == "snis" and parent is not None and isinstance(item, str):
            item = {"name": item}  # Kong's Admin API shorthand: certificates[].snis as plain names
        levels = above + (Level(collection, index, _label(collection, item)),)
        if not isinstance(item, dict):
            self.fail("expected a record", EntityRef(collection, levels, item))
            return
        data = dict(item)
        children = {name: data.pop(name) for name in _CHILDREN.get(collection, ()) if name in data}
        ref = EntityRef(collection, levels, dict(data))
        entry = _Entry(collection, ref, data, parent)
        if parent is not None:
            parent_field = _PARENT_FIELD[parent.collection]
            if data.get(parent_field) is not None:
                self.fail(
                    "value must be null: a nested entry is linked to its parent automatically", ref, (parent_field,)
                )
                entry.broken_fields.add(parent_field)
        self.entries[collection].append(entry)
        for child, value in children.items():
            for child_index, child_item in enumerate(self._items(value, ref, (child,))):
                self._collect(child, child_index, child_item, entry, levels)

    def _migrate_paths(self) -> None:
        for entry in self.entries["routes"]:
            paths = entry.data.get("paths")
            if isinstance(paths, list):
                entry.data["paths"] = [migrate_legacy_path(p) if isinstance(p, str) else p for p in paths]

    # -- ids and references --------------------------------------------------------------------

    def _assign_ids(self, collections: tuple[str, ...]) -> None:
        for collection in collections:
            namespace = _TYPE_NAMESPACES[collection]
            seen_keys: dict[str, int] = {}
            for entry in self.entries[collection]:
                given = entry.data.get("id")
                if isinstance(given, str):
                    entry.ref.id = given
                    continue
                key = self._id_key(entry)
                if key is None:
                    # No endpoint key: derive one from the content, numbered to keep twins apart.
                    key = "content:" + _canonical(entry.data) + ":" + (entry.parent.id if entry.parent else "")
                    seen_keys[key] = seen_keys.get(key, 0) + 1
                    key += f"#{seen_keys[key]}"
                entry.ref.id = str(uuid.uuid5(namespace, key))
            for entry in self.entries[collection]:
                if entry.parent is not None:
                    parent_field = _PARENT_FIELD[entry.parent.collection]
                    entry.ref.raw.setdefault(parent_field, {"id": entry.parent.id})

    def _id_key(self, entry: _Entry) -> str | None:
        """Kong's key for a generated id: the endpoint key, scoped by parent where not unique."""
        data = entry.data
        if entry.collection in _NAMED:
            name = data.get("name")
            return name if isinstance(name, str) and name else None
        if entry.collection == "targets":
            target, upstream = data.get("target"), data.get("upstream")
            if isinstance(target, str) and isinstance(upstream, str):
                return f"{target}:{upstream}"
            return None
        name = data.get("name")
        if not isinstance(name, str):
            return None
        scope = (data.get("route"), data.get("service"), data.get("consumer"))
        if not all(part is None or isinstance(part, str) for part in scope):
            return None
        return "plugins:" + name + ":" + ":".join(part or "" for part in scope)

    def _resolve_references(self) -> None:
        by_key: dict[str, dict[str, str]] = {}
        for collection in {target for references in _REFERENCES.values() for _, target in references}:
            keys: dict[str, str] = {}
            for entry in self.entries[collection] if collection in _NAMED else ():
                name = entry.data.get("name")
                if isinstance(name, str):
                    keys.setdefault(name, entry.id)
            for entry in self.entries[collection]:
                keys.setdefault(entry.id, entry.id)
            by_key[collection] = keys
        for collection, references in _REFERENCES.items():
            for entry in self.entries[collection]:
                parent_field = _PARENT_FIELD[entry.parent.collection] if entry.parent else None
                for field_name, target in references:
                    if field_name == parent_field:
                        entry.data[field_name] = entry.parent.id  # type: ignore[union-attr]
                        continue
                    value = entry.data.get(field_name)
                    if value is None:
                        continue
                    resolved = self._resolve(entry, field_name, value, target, by_key[target])
                    entry.data[field_name] = resolved
                    if resolved is None:
                        entry.broken_fields.add(field_name)
                if collection == "plugins" and entry.data.get("consumer") is not None:
                    self.fail("consumer-scoped plugins are not supported by Ringgate yet", entry.ref, ("consumer",))
                    entry.data["consumer"] = None
                    entry.broken_fields.add("consumer")

    def _label_certificates(self) -> None:
        """Name certificates in messages by their SNIs (nested and top-level) and the id the user gave."""
        names: dict[str, dict[str, None]] = {}
        for sni in self.entries["snis"]:
            name, certificate = sni.data.get("name"), sni.data.get("certificate")
            if isinstance(name, str) and isinstance(certificate, str):
                names.setdefault(certificate, {})[f"'{name}'"] = None  # a dict keeps order and drops repeats
        for entry in self.entries["certificates"]:
            parts = [f"id '{entry.id}'"] if isinstance(entry.data.get("id"), str) else []
            if entry.id in names:
                parts.append("snis " + ", ".join(names[entry.id]))
            if parts:
                level = entry.ref.levels[-1]
                entry.ref.levels = entry.ref.levels[:-1] + (Level(level.collection, level.index, ", ".join(parts)),)
        for sni in self.entries["snis"]:
            if sni.parent is not None:  # nested: show the parent as labelled above
                above = sni.parent.ref.levels
                sni.ref.levels = above + sni.ref.levels[len(above) :]

    def _resolve(self, entry: _Entry, field_name: str, value: Any, target: str, keys: dict[str, str]) -> str | None:
        key: Any = value
        if isinstance(value, dict):
            if len(value) == 1 and ("name" in value or "id" in value):
                key = next(iter(value.values()))
            else:
                key = None
        if not isinstance(key, str):
            self.fail("expected a name or id, or a record with 'name' or 'id'", entry.ref, (field_name,))
            return None
        found = keys.get(key)
        if found is None:
            self.fail(
                f"invalid reference '{field_name}: {key}' (no such entry in '{target}')", entry.ref, (field_name,)
            )
        return found

    # -- validation ------------------------------------------------------------------------------

    def _validate(self) -> None:
        for collection, entries in self.entries.items():
            model_type = _MODELS[collection]
            for entry in entries:
                # Kong reads null as "not set": required fields report missing, others take defaults.
                entry.data = {key: value for key, value in entry.data.items() if value is not None}
                entry.data.setdefault("id", entry.id)
                try:
                    entry.model = model_type.model_validate(entry.data)
                except ValidationError as exc:
                    for problem in problems_from_validation_error(exc, entry.ref):
                        if not (problem.field and problem.field[0] in entry.broken_fields):
                            self.problems.append(problem)
                    continue
                if isinstance(entry.model, Plugin):
                    self._validate_plugin_config(entry, entry.model)

    def _validate_plugin_config(self, entry: _Entry, plugin: Plugin) -> None:
        config_model = plugin_config_model(plugin.name)
        if config_model is None:
            return
        try:
            config = config_model.model_validate(plugin.config)
        except ValidationError as exc:
            self.problems.extend(problems_from_validation_error(exc, entry.ref, ("config",)))
            entry.model = None
            return
        entry.model = plugin.model_copy(update={"config": _dump_config(config)})

    def _check_uniqueness(self) -> None:
        for collection in _NAMED:
            names: set[str] = set()
            for entry in self.entries[collection]:
                name = entry.data.get("name")
                if isinstance(name, str):
                    if name in names:
                        self._duplicate(entry, _unique_message(collection, "name", name))
                    names.add(name)
        digests: set[str] = set()
        for entry in self.entries["ca_certificates"]:
            if isinstance(entry.model, CACertificate) and entry.model.cert_digest is not None:
                if entry.model.cert_digest in digests:
                    self._duplicate(entry, _unique_message("ca_certificates", "cert_digest", entry.model.cert_digest))
                digests.add(entry.model.cert_digest)
        pairs: set[tuple[Any, str]] = set()
        for entry in self.entries["targets"]:
            target = entry.model.target if isinstance(entry.model, Target) else entry.data.get("target")
            if isinstance(target, str) and not entry.broken_fields:
                pair = (entry.data.get("upstream"), target)
                if pair in pairs:
                    self._duplicate(entry, _unique_message("targets", "target", target))
                pairs.add(pair)
        scopes: set[tuple[Any, ...]] = set()
        for entry in self.entries["plugins"]:
            name = entry.data.get("name")
            if entry.broken_fields or not isinstance(name, str):
                continue  # a scope with an unresolved reference is not comparable
            scope = (name, entry.data.get("route"), entry.data.get("service"), entry.data.get("consumer"))
            if scope in scopes:
                self._duplicate(
                    entry, _unique_message("plugins", "name", name) + " for the same route, service and consumer"
                )
            scopes.add(scope)
        for collection, entries in self.entries.items():
            ids: set[str] = set()
            for entry in entries:
                # Generated ids repeat exactly when the key they come from does: reported above.
                if entry.id in ids and not entry.duplicate and not entry.broken_fields:
                    self._duplicate(entry, _unique_message(collection, "primary key", entry.id))
                ids.add(entry.id)

    def _duplicate(self, entry: _Entry, message: str) -> None:
        entry.duplicate = True
        self.fail(message, entry.ref)

    # -- snapshot ----------------------------------------------------------------------------------

    def _snapshot(self, version: str) -> Config:
        targets_by_upstream: dict[str, list[Target]] = {}
        for target in self._models("targets", Target):
            targets_by_upstream.setdefault(target.upstream, []).append(target)
        upstreams = tuple(
            upstream.model_copy(update={"targets": tuple(targets_by_upstream.get(upstream.id, ()))})
            for upstream in self._models("upstreams", Upstream)
        )
        return Config(
            format_version=version,
            services=tuple(self._models("services", Service)),
            routes=tuple(self._models("routes", Route)),
            upstreams=upstreams,
            plugins=tuple(self._models("plugins", Plugin)),
            certificates=tuple(self._models("certificates", Certificate)),
            ca_certificates=tuple(self._models("ca_certificates", CACertificate)),
            snis=tuple(self._models("snis", ServerName)),
            **self.opaque,
        )

    def _models(self, collection: str, model_type: type[_M]) -> Iterator[_M]:
        for entry in self.entries[collection]:
            assert isinstance(entry.model, model_type)
            yield entry.model


def _label(collection: str, item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    key = "target" if collection == "targets" else "name"
    value = item.get(key)
    return f"{key} '{value}'" if isinstance(value, str) and value else None


def _unique_message(collection: str, key: str, value: str) -> str:
    return f"uniqueness violation: '{collection}' entity with {key} set to '{value}' already declared"


def _copy_tree(value: Any) -> Any:
    """Copy the containers of a parsed document (much faster than deepcopy; leaves are immutable)."""
    if isinstance(value, dict):
        return {key: _copy_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy_tree(item) for item in value]
    return value


def _canonical(data: Any) -> str:
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str).decode()


def _dump_config(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


__all__ = ["Config", "ConfigError", "load_dict", "load_file", "load_text"]
