"""Entity endpoints: URL -> (kind, key, scope); body -> fields; write -> validate -> persist -> answer.

For every kind (services, routes, upstreams, targets, plugins, certificates, snis, ca_certificates)
and every reference it holds, the same endpoints Kong generates:
  /{kind}                       GET (page), POST
  /{kind}/{key}                 GET, PATCH, PUT, DELETE
  /{parent}/{p}/{kind}          GET, POST            e.g. /services/{s}/routes
  /{parent}/{p}/{kind}/{key}    GET, PATCH, PUT, DELETE
  /{kind}/{key}/{reference}     GET, PATCH, PUT, DELETE   e.g. /routes/{r}/service
Certificates add Kong's twists (ringgate.admin.certificates): named by id or by one of their SNIs,
and the `snis` pseudo-field on every write and answer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ringgate.admin import certificates, entities, errors
from ringgate.admin.api import AdminContext, Request, Response, Route, route
from ringgate.admin.entities import KINDS, Document, EntityData, Kind, Scope, Written
from ringgate.admin.forms import coerce, decode_body
from ringgate.admin.state import Snapshot
from ringgate.config import ConfigError, load_dict
from ringgate.config.schema import is_uuid, plugin_config_model

SOURCE = "admin API"


@dataclass(frozen=True, slots=True)
class Nesting:
    """The parent of a nested URL: its kind, and the child's field that points at it."""

    parent: Kind
    field: str


class Endpoints:
    """The handlers of one kind, top-level (`nesting` None) or under a parent."""

    def __init__(self, kind: Kind, nesting: Nesting | None = None) -> None:
        self.kind = kind
        self.nesting = nesting

    def _scope(self, document: Document, params: dict[str, str]) -> Scope | None:
        if self.nesting is None:
            return None
        parent = entities.require(document, self.nesting.parent, params["parent"])
        return Scope(self.nesting.field, parent["id"])

    def listing(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        document = context.state.snapshot.document
        scope = self._scope(document, params)
        matches = _tag_filter(request.query.get("tags"))
        items = [item for item in entities.entries(document, self.kind.collection)
                 if (scope is None or scope.holds(item)) and matches(item)]
        page = entities.page(items, request.query.get("size"), request.query.get("offset"))
        body: dict[str, Any] = {"data": [entities.present(self.kind, item, document) for item in page.data],
                                "next": None}
        if page.offset is not None:
            following = f"{request.path}?offset={quote(page.offset)}"
            for name in ("size", "tags"):
                if name in request.query:
                    following += f"&{name}={quote(request.query[name])}"
            body["next"] = following
            body["offset"] = page.offset
        return Response(200, body)

    def get(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        document = context.state.snapshot.document
        entity = entities.require(document, self.kind, params["key"], self._scope(document, params))
        return Response(200, entities.present(self.kind, entity, document))

    def create(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.kind, request)

        def operation(document: Document) -> Written:
            return entities.create(document, self.kind, body, now=context.now(), new_id=context.new_id,
                                   scope=self._scope(document, params))

        return _answer(self.kind, 201, *commit(context, operation))

    def patch(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.kind, request, self._stored_plugin_name(context, params))

        def operation(document: Document) -> Written:
            scope = self._scope(document, params)
            if self.nesting is not None:
                body.setdefault(self.nesting.field, scope.parent_id if scope else None)
            return entities.update(document, self.kind, params["key"], body, now=context.now(), scope=scope)

        return _answer(self.kind, 200, *commit(context, operation))

    def put(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.kind, request, self._stored_plugin_name(context, params))

        def operation(document: Document) -> Written:
            return entities.upsert(document, self.kind, params["key"], body, now=context.now(),
                                   new_id=context.new_id, scope=self._scope(document, params))

        return _answer(self.kind, 200, *commit(context, operation))

    def delete(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        def operation(document: Document) -> Written | None:
            return entities.delete(document, self.kind, params["key"], self._scope(document, params))

        commit(context, operation)
        return Response(204)

    def _stored_plugin_name(self, context: AdminContext, params: dict[str, str]) -> str | None:
        if self.kind.collection != "plugins":
            return None
        found = entities.find(context.state.snapshot.document, self.kind, params["key"])
        return found[1].get("name") if found else None

    def routes(self) -> list[Route]:
        if self.nesting is None:
            base = f"/{self.kind.collection}"
        else:
            base = f"/{self.nesting.parent.collection}/{{parent}}/{self.kind.collection}"
        return [
            route(base, GET=self.listing, POST=self.create),
            route(base + "/{key}", GET=self.get, PATCH=self.patch, PUT=self.put, DELETE=self.delete),
        ]


class ReferencedEndpoints:
    """`/{kind}/{key}/{field}`: the entity that `field` of an entity points at (/routes/{r}/service)."""

    def __init__(self, kind: Kind, field_name: str, target: Kind) -> None:
        self.kind = kind
        self.field = field_name
        self.target = target

    def _target_id(self, document: Document, params: dict[str, str]) -> str:
        entity = entities.require(document, self.kind, params["key"])
        target_id = entity.get(self.field)
        if not isinstance(target_id, str):
            raise errors.not_found()
        return target_id

    def get(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        document = context.state.snapshot.document
        target = entities.by_id(document, self.target.collection, self._target_id(document, params))
        if target is None:
            raise errors.not_found()
        return Response(200, entities.present(self.target, target, document))

    def patch(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.target, request)
        names = certificates.take_names(body) if self.target.collection == "certificates" else None

        def operation(document: Document) -> Written:
            written = entities.update(document, self.target, self._target_id(document, params), body,
                                      now=context.now())
            return certificates.with_names(written, names, now=context.now(), new_id=context.new_id)

        return _answer(self.target, 200, *commit(context, operation))

    def put(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.target, request)
        names = certificates.take_names(body) if self.target.collection == "certificates" else None
        if self.target.collection == "certificates" and names is None:
            names = []  # PUT replaces the whole certificate, its SNIs included

        def operation(document: Document) -> Written:
            written = entities.upsert(document, self.target, self._target_id(document, params), body,
                                      now=context.now(), new_id=context.new_id)
            return certificates.with_names(written, names, now=context.now(), new_id=context.new_id)

        return _answer(self.target, 200, *commit(context, operation))

    def delete(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        self._target_id(context.state.snapshot.document, params)  # 404 when there is none
        raise errors.method_not_allowed()  # as Kong: delete the entity at its own URL

    def routes(self) -> list[Route]:
        return [route(f"/{self.kind.collection}/{{key}}/{self.field}",
                      GET=self.get, PATCH=self.patch, PUT=self.put, DELETE=self.delete)]


class CertificateEndpoints(Endpoints):
    """/certificates and /certificates/{id or SNI name}: Kong's `snis` pseudo-field on writes.

    As in Kong, a URL naming an SNI that does not exist answers 404 "SNI not found", except PUT,
    which creates a certificate served for that name.
    """

    def create(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.kind, request)
        names = certificates.take_names(body)

        def operation(document: Document) -> Written:
            written = entities.create(document, self.kind, body, now=context.now(), new_id=context.new_id)
            return certificates.with_names(written, names, now=context.now(), new_id=context.new_id)

        return _answer(self.kind, 201, *commit(context, operation))

    def patch(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.kind, request)
        names = certificates.take_names(body)

        def operation(document: Document) -> Written:
            written = entities.update(document, self.kind, params["key"], body, now=context.now())
            return certificates.with_names(written, names, now=context.now(), new_id=context.new_id)

        return _answer(self.kind, 200, *commit(context, operation))

    def put(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        body = read_fields(self.kind, request)
        key = params["key"]
        names = certificates.take_names(body) or []  # without `snis`, PUT leaves the certificate none
        if not is_uuid(key):
            # Named by an SNI: that name stays (or becomes) one the certificate is served for. Kong
            # drops it when the body has no `snis`; keeping it is what a PUT to that URL asks for.
            names = certificates.take_names({certificates.FIELD: sorted({*names, key})}) or []

        def operation(document: Document) -> Written:
            found = entities.find(document, self.kind, key)
            entity_id = found[1]["id"] if found is not None else key if is_uuid(key) else context.new_id()
            written = entities.upsert(document, self.kind, entity_id, body, now=context.now(),
                                      new_id=context.new_id)
            return certificates.with_names(written, names, now=context.now(), new_id=context.new_id)

        return _answer(self.kind, 200, *commit(context, operation))

    def delete(self, context: AdminContext, request: Request, params: dict[str, str]) -> Response:
        if not is_uuid(params["key"]):
            entities.require(context.state.snapshot.document, self.kind, params["key"])  # "SNI not found"
        return super().delete(context, request, params)


def routes() -> list[Route]:
    table: list[Route] = []
    for kind in KINDS.values():
        top = CertificateEndpoints(kind) if kind.collection == "certificates" else Endpoints(kind)
        table += top.routes()
        for field_name, collection in kind.references:
            table += Endpoints(kind, Nesting(KINDS[collection], field_name)).routes()
            table += ReferencedEndpoints(kind, field_name, KINDS[collection]).routes()
    return table


# --------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------


def read_fields(kind: Kind, request: Request, stored_plugin_name: str | None = None) -> EntityData:
    """The request body as entity fields; form text typed by the kind's schema."""
    body, is_form = decode_body(request.header("content-type"), request.body)
    if not is_form:
        return body
    body = coerce(kind.model, body)
    if kind.collection == "plugins" and isinstance(body.get("config"), dict):
        name = body.get("name", stored_plugin_name)
        config_model = plugin_config_model(name) if isinstance(name, str) else None
        if config_model is not None:
            body["config"] = coerce(config_model, body["config"])
    return body


def commit(context: AdminContext, operation: Callable[[Document], Written | None]) -> tuple[Snapshot, Written | None]:
    """Apply `operation` to the current document under the config lock; validate the whole result."""

    def build(current: Snapshot) -> tuple[Any, Written | None]:
        written = operation(current.document)
        if written is None:
            return None, None
        try:
            config = load_dict(written.document, SOURCE)
        except ConfigError as exc:
            index = written.index if written.index is not None else -1
            raise errors.schema_violation(errors.entity_fields(exc, written.collection, index)) from None
        return config, written

    return context.state.commit(build)


def _answer(kind: Kind, status: int, snapshot: Snapshot, written: Written | None) -> Response:
    assert written is not None and written.entity_id is not None
    entity = entities.by_id(snapshot.document, kind.collection, written.entity_id)
    if entity is None:
        raise errors.not_found()
    return Response(status, entities.present(kind, entity, snapshot.document))


def _tag_filter(tags: str | None) -> Callable[[EntityData], bool]:
    """Kong's ?tags=: "a,b" needs every tag, "a/b" any of them."""
    if not tags:
        return lambda item: True
    if "/" in tags:
        wanted = set(tags.split("/"))
        return lambda item: bool(wanted & set(item.get("tags") or ()))
    required = set(tags.split(","))
    return lambda item: required <= set(item.get("tags") or ())
