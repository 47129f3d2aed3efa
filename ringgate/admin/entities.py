"""Kong's entity CRUD as pure functions over the declarative document.

The document is the canonical form `Config.to_dict()` gives: top-level collections, every entity
with its id, references by id. Each write takes a document and returns a new one (the input is
never changed) plus the id of the entity to answer with; the caller validates the whole new
document with `load_dict` before anything is persisted, so a refused write changes nothing.

What is decided here, as Kong decides it: lookup by id or endpoint key, nested scopes
(`/services/{s}/routes`), foreign keys given by id or name, uniqueness (409), primary keys,
PATCH merging records, PUT replacing (and creating) an entity, DELETE cascading where Kong
cascades and refusing where Kong restricts, pagination.
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pydantic_core import PydanticCustomError

from ringgate.admin import errors
from ringgate.config.schema import (
    CACertificate,
    Certificate,
    Entity,
    Plugin,
    Route,
    ServerName,
    Service,
    Target,
    Upstream,
    is_uuid,
    normalize_target,
)

Document = dict[str, Any]
EntityData = dict[str, Any]

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
_URL_FIELDS: Final = ("protocol", "host", "port", "path")
_TIMESTAMPS: Final = ("created_at", "updated_at")


@dataclass(frozen=True, slots=True)
class Kind:
    """One entity type of the Admin API."""

    collection: str  # "services": the URL segment and the document key
    model: type[Entity]
    endpoint_key: str | None  # besides the id, what a URL may name the entity by
    references: tuple[tuple[str, str], ...] = ()  # (field, collection) this entity points to
    # Fields merged key by key on PATCH (Kong's record fields); others are replaced whole.
    records: tuple[str, ...] = ()


KINDS: Final = {
    kind.collection: kind
    for kind in (
        Kind("services", Service, "name"),
        Kind("routes", Route, "name", (("service", "services"),)),
        Kind("upstreams", Upstream, "name", records=("healthchecks",)),
        Kind("targets", Target, "target", (("upstream", "upstreams"),)),
        Kind("plugins", Plugin, "instance_name", (("service", "services"), ("route", "routes")), ("config",)),
        # A certificate has no endpoint key of its own: a URL may name it by one of its SNIs instead.
        Kind("certificates", Certificate, None),
        Kind("snis", ServerName, "name", (("certificate", "certificates"),)),
        Kind("ca_certificates", CACertificate, None),
    )
}

# Who points at whom, and what Kong does when the pointed-at entity is deleted.
_CASCADES: Final = {"services": (("plugins", "service"),), "routes": (("plugins", "route"),),
                    "upstreams": (("targets", "upstream"),), "certificates": (("snis", "certificate"),)}
_RESTRICTS: Final = {"services": (("routes", "service"),),
                     "certificates": (("services", "client_certificate"), ("upstreams", "client_certificate"))}


@dataclass(frozen=True, slots=True)
class Scope:
    """A nested URL's parent: only entities whose `field` is `parent_id` belong to it."""

    field: str
    parent_id: str

    def holds(self, entity: EntityData) -> bool:
        return entity.get(self.field) == self.parent_id


@dataclass(frozen=True, slots=True)
class Written:
    """A write's outcome: the new document and the entity to answer with (None after a delete)."""

    document: Document
    collection: str
    entity_id: str | None
    index: int | None  # the entity's place in its collection (to attribute validation errors)
    created: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    data: list[EntityData]
    offset: str | None  # the token for the next page, None on the last one


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def entries(document: Document, collection: str) -> list[EntityData]:
    return document.get(collection) or []


def find(document: Document, kind: Kind, key: str, scope: Scope | None = None) -> tuple[int, EntityData] | None:
    """The entity named by `key` (its id, or its endpoint key), within `scope` when given.

    A certificate is named by its id or by one of its SNIs' names."""
    by_id = is_uuid(key)
    if kind.collection == "certificates" and not by_id:
        sni = next((item for item in entries(document, "snis") if item.get("name") == key), None)
        if sni is None or not isinstance(sni.get("certificate"), str):
            return None
        key, by_id = sni["certificate"], True
    wanted = key
    if not by_id and kind.collection == "targets":
        wanted = _normalized_target(key) or key
    for index, entity in enumerate(entries(document, kind.collection)):
        if scope is not None and not scope.holds(entity):
            continue
        if by_id and entity.get("id") == key:
            return index, entity
        if not by_id and kind.endpoint_key is not None and entity.get(kind.endpoint_key) == wanted:
            return index, entity
    if by_id and kind.endpoint_key is not None:
        # A name may itself look like a uuid; Kong tries the id first, then the endpoint key.
        for index, entity in enumerate(entries(document, kind.collection)):
            if (scope is None or scope.holds(entity)) and entity.get(kind.endpoint_key) == key:
                return index, entity
    return None


def require(document: Document, kind: Kind, key: str, scope: Scope | None = None) -> EntityData:
    found = find(document, kind, key, scope)
    if found is None:
        raise missing(kind, key)
    return found[1]


def missing(kind: Kind, key: str) -> errors.AdminError:
    """404; a certificate URL naming an SNI that does not exist gets Kong's own text."""
    if kind.collection == "certificates" and not is_uuid(key):
        return errors.message_error(404, "SNI not found")
    return errors.not_found()


def by_id(document: Document, collection: str, entity_id: str) -> EntityData | None:
    for entity in entries(document, collection):
        if entity.get("id") == entity_id:
            return entity
    return None


def page(items: list[EntityData], size: str | None, offset: str | None) -> Page:
    """One page of `items`: `size` (default 100, 1..1000) from the opaque `offset` token."""
    count = _page_size(size)
    start = _decode_offset(offset) if offset is not None else 0
    end = start + count
    following = encode_offset(end) if end < len(items) else None
    return Page(items[start:end], following)


def _page_size(size: str | None) -> int:
    if size is None:
        return DEFAULT_PAGE_SIZE
    try:
        value = float(size)
    except ValueError:
        raise errors.invalid_size("size must be a number") from None
    if not value.is_integer() or not 1 <= value <= MAX_PAGE_SIZE:
        raise errors.invalid_size(f"size must be an integer between 1 and {MAX_PAGE_SIZE}")
    return int(value)


def sni_names(document: Document, certificate_id: Any) -> list[str]:
    """The names a certificate is served for, sorted (Kong's `snis` pseudo-field)."""
    return sorted(item["name"] for item in entries(document, "snis") if item.get("certificate") == certificate_id)


def encode_offset(index: int) -> str:
    return base64.urlsafe_b64encode(f"ringgate:{index}".encode()).decode().rstrip("=")


def _decode_offset(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise errors.invalid_offset(token, "bad base64 encoding") from None
    prefix, _, number = text.partition(":")
    if prefix != "ringgate" or not number.isdigit():
        raise errors.invalid_offset(token, "bad base64 encoding")
    return int(number)


def present(kind: Kind, entity: EntityData, document: Document | None = None) -> EntityData:
    """An entity as Kong answers it: references as {"id": ...}, timestamps in whole seconds, and a
    certificate with Kong's `snis` pseudo-field (its SNIs' names, sorted) when `document` is given."""
    shown = dict(entity)
    if kind.collection == "certificates" and document is not None:
        shown["snis"] = sni_names(document, entity.get("id"))
    for field_name, _ in kind.references:
        value = shown.get(field_name)
        shown[field_name] = {"id": value} if isinstance(value, str) else value
    if kind.collection == "plugins":
        shown["consumer"] = None
    certificate = shown.get("client_certificate")
    if isinstance(certificate, str):  # services and upstreams: a reference shown the same way
        shown["client_certificate"] = {"id": certificate}
    for stamp in _TIMESTAMPS:
        value = shown.get(stamp)
        if isinstance(value, float):
            shown[stamp] = int(value)
    return shown


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def create(document: Document, kind: Kind, body: EntityData, *, now: int, new_id: Callable[[], str],
           scope: Scope | None = None) -> Written:
    """POST: a new entity; an id is generated (and stored) unless the body gives one."""
    entity = dict(body)
    if scope is not None:
        entity[scope.field] = scope.parent_id
    given_id = entity.get("id")
    if isinstance(given_id, str) and by_id(document, kind.collection, given_id) is not None:
        raise errors.primary_key_violation(given_id)
    if given_id is None:
        entity["id"] = new_id()
    entity = _prepared(document, kind, entity, now, created_at=None)
    collection = [*entries(document, kind.collection), entity]
    return Written({**document, kind.collection: collection}, kind.collection, entity["id"], len(collection) - 1,
                   created=True)


def update(document: Document, kind: Kind, key: str, body: EntityData, *, now: int,
           scope: Scope | None = None) -> Written:
    """PATCH: the given fields over the stored ones; record fields are merged key by key."""
    found = find(document, kind, key, scope)
    if found is None:
        raise missing(kind, key)
    index, stored = found
    merged = dict(stored)
    if kind.collection == "services" and "url" in body:
        for name in _URL_FIELDS:  # the url shorthand replaces what it stands for
            merged.pop(name, None)
    for name, value in body.items():
        if name in kind.records and isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge_records(merged[name], value)
        else:
            merged[name] = value
    merged["id"] = stored["id"]
    entity = _prepared(document, kind, merged, now, created_at=stored.get("created_at"))
    return _replace(document, kind, index, entity)


def upsert(document: Document, kind: Kind, key: str, body: EntityData, *, now: int, new_id: Callable[[], str],
           scope: Scope | None = None) -> Written:
    """PUT: the body becomes the whole entity named by `key`, created when there is none."""
    entity = dict(body)
    if scope is not None:
        entity[scope.field] = scope.parent_id
    found = find(document, kind, key, scope)
    if is_uuid(key) and (found is None or found[1].get("id") == key):
        entity["id"] = key
    elif kind.endpoint_key is not None:
        entity[kind.endpoint_key] = key
    else:
        raise errors.not_found()
    if found is not None:
        index, stored = found
        entity["id"] = stored["id"]
        prepared = _prepared(document, kind, entity, now, created_at=stored.get("created_at"))
        return _replace(document, kind, index, prepared)
    if "id" not in entity:
        entity["id"] = new_id()
    if by_id(document, kind.collection, entity["id"]) is not None:
        raise errors.primary_key_violation(entity["id"])  # the id belongs to another scope
    prepared = _prepared(document, kind, entity, now, created_at=None)
    collection = [*entries(document, kind.collection), prepared]
    return Written({**document, kind.collection: collection}, kind.collection, prepared["id"],
                   len(collection) - 1, created=True)


def delete(document: Document, kind: Kind, key: str, scope: Scope | None = None) -> Written | None:
    """DELETE: None when there is nothing to delete (Kong answers 204 all the same)."""
    found = find(document, kind, key, scope)
    if found is None:
        return None
    _, entity = found
    entity_id = entity["id"]
    for child, field_name in _RESTRICTS.get(kind.collection, ()):
        if any(item.get(field_name) == entity_id for item in entries(document, child)):
            raise errors.foreign_key_restricted(kind.collection, child)
    if kind.collection == "ca_certificates":
        # Services list the CAs they trust in an array, not a foreign key: Kong checks it by hand.
        user = next((item for item in entries(document, "services")
                     if entity_id in (item.get("ca_certificates") or ())), None)
        if user is not None:
            raise errors.referenced_by_others(
                f"ca certificate {entity_id} is still referenced by services (id = {user['id']})")
    new_document = {**document,
                    kind.collection: [item for item in entries(document, kind.collection) if item is not entity]}
    for child, field_name in _CASCADES.get(kind.collection, ()):
        new_document[child] = [item for item in entries(new_document, child) if item.get(field_name) != entity_id]
    return Written(new_document, kind.collection, None, None)


# --------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------


def _replace(document: Document, kind: Kind, index: int, entity: EntityData) -> Written:
    collection = list(entries(document, kind.collection))
    collection[index] = entity
    return Written({**document, kind.collection: collection}, kind.collection, entity["id"], index)


def _prepared(document: Document, kind: Kind, entity: EntityData, now: int, created_at: Any) -> EntityData:
    """References resolved to ids, timestamps set, uniqueness checked against the others."""
    entity = _resolve_references(document, kind, entity)
    entity["created_at"] = created_at if created_at is not None else now
    entity["updated_at"] = now
    _check_unique(document, kind, entity)
    return entity


def _resolve_references(document: Document, kind: Kind, entity: EntityData) -> EntityData:
    for field_name, collection in kind.references:
        value = entity.get(field_name)
        if value is None:
            continue
        if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), str):
            key_name, key = next(iter(value.items()))
        elif isinstance(value, str):
            key_name, key = ("id" if is_uuid(value) else "name"), value
        else:
            continue  # not a reference at all: the schema reports it
        if key_name not in ("id", "name"):
            continue
        target = find(document, KINDS[collection], key)
        by_name_only_through_sni = key_name == "name" and KINDS[collection].endpoint_key is None
        if target is None or by_name_only_through_sni or (key_name == "id" and target[1].get("id") != key):
            raise errors.foreign_key_invalid(field_name, {key_name: key}, collection)
        entity[field_name] = target[1]["id"]
    return entity


def _check_unique(document: Document, kind: Kind, entity: EntityData) -> None:
    others = [item for item in entries(document, kind.collection) if item.get("id") != entity.get("id")]
    if kind.collection in ("services", "routes", "upstreams", "snis"):
        name = entity.get("name")
        if isinstance(name, str) and any(item.get("name") == name for item in others):
            raise errors.unique_violation({"name": name})
    elif kind.collection == "targets":
        target = entity.get("target")
        normalized = _normalized_target(target) if isinstance(target, str) else None
        upstream = entity.get("upstream")
        if normalized is not None and any(
            item.get("upstream") == upstream and item.get("target") == normalized for item in others
        ):
            raise errors.unique_violation({"target": normalized, "upstream": {"id": upstream}})
    elif kind.collection == "ca_certificates":
        digest = _ca_digest(entity.get("cert"))
        if digest is not None and any((item.get("cert_digest") or _ca_digest(item.get("cert"))) == digest
                                      for item in others):
            raise errors.unique_violation({"cert_digest": digest})
    elif kind.collection == "plugins":
        instance_name = entity.get("instance_name")
        if isinstance(instance_name, str) and any(item.get("instance_name") == instance_name for item in others):
            raise errors.unique_violation({"instance_name": instance_name})
        scope = _plugin_scope(entity)
        if any(_plugin_scope(item) == scope for item in others):
            name, route, service, consumer = scope
            raise errors.unique_violation({
                "name": name,
                "route": {"id": route} if route else None,
                "service": {"id": service} if service else None,
                "consumer": {"id": consumer} if consumer else None,
            })


def _ca_digest(cert: Any) -> str | None:
    """The digest Kong keeps unique; None for text that is not a certificate (the schema reports it)."""
    if not isinstance(cert, str):
        return None
    from ringgate.tls import ca_certificate_digest  # needs `cryptography`: only where CAs are written

    try:
        return ca_certificate_digest(cert)
    except ValueError:
        return None


def _plugin_scope(entity: EntityData) -> tuple[Any, ...]:
    return tuple(entity.get(name) for name in ("name", "route", "service", "consumer"))


def _normalized_target(target: str) -> str | None:
    try:
        return normalize_target(target)
    except PydanticCustomError:
        return None


def _merge_records(stored: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = dict(stored)
    for name, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge_records(merged[name], value)
        else:
            merged[name] = value
    return merged
