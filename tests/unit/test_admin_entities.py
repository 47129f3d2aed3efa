"""Entity CRUD as pure functions over the canonical document: Kong's lookups, writes and refusals."""
from __future__ import annotations

import itertools
from typing import Any

import pytest

from ringgate.admin import entities
from ringgate.admin.entities import KINDS, Scope
from ringgate.admin.errors import AdminError
from ringgate.config import load_dict

SERVICES, ROUTES, UPSTREAMS, TARGETS, PLUGINS = (KINDS[name] for name in
                                                 ("services", "routes", "upstreams", "targets", "plugins"))
NOW = 1_700_000_000


def canonical(**collections: Any) -> dict[str, Any]:
    return load_dict({"_format_version": "3.0", **collections}).to_dict()


@pytest.fixture
def document() -> dict[str, Any]:
    return canonical(
        services=[{"name": "billing", "host": "billing.internal",
                   "routes": [{"name": "pay", "paths": ["/pay"]}, {"name": "refund", "paths": ["/refund"]}]},
                  {"name": "lonely", "host": "lonely.internal"}],
        upstreams=[{"name": "up.internal", "targets": [{"target": "10.0.0.1:80"}, {"target": "10.0.0.2"}]}],
    )


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"00000000-0000-4000-8000-{next(counter):012d}"


def refused(call: Any, *args: Any, **kwargs: Any) -> AdminError:
    with pytest.raises(AdminError) as caught:
        call(*args, **kwargs)
    return caught.value


def valid(written: entities.Written) -> dict[str, Any]:
    """The written document must load; returns it in canonical form."""
    return load_dict(written.document).to_dict()


# ----------------------------------------------------------------------------------------------
# Lookups and answers
# ----------------------------------------------------------------------------------------------


def test_find_by_id_name_target_and_scope(document: dict[str, Any]) -> None:
    billing = entities.require(document, SERVICES, "billing")
    assert entities.require(document, SERVICES, billing["id"]) is billing
    assert entities.require(document, ROUTES, "pay", Scope("service", billing["id"]))["paths"] == ["/pay"]
    lonely = entities.require(document, SERVICES, "lonely")
    assert entities.find(document, ROUTES, "pay", Scope("service", lonely["id"])) is None
    upstream = entities.require(document, UPSTREAMS, "up.internal")
    scope = Scope("upstream", upstream["id"])
    # A target is named by its normalized "host:port": "10.0.0.2" means port 8000.
    assert entities.require(document, TARGETS, "10.0.0.2:8000", scope)["target"] == "10.0.0.2:8000"
    assert entities.require(document, TARGETS, "10.0.0.2", scope)["target"] == "10.0.0.2:8000"
    assert refused(entities.require, document, SERVICES, "nope").body == {"message": "Not found"}


def test_present_shows_references_as_records_and_whole_seconds(document: dict[str, Any]) -> None:
    written = entities.create(document, ROUTES, {"paths": ["/x"], "service": "lonely"}, now=NOW, new_id=ids())
    route = entities.by_id(valid(written), "routes", written.entity_id or "")
    assert route is not None
    shown = entities.present(ROUTES, route)
    lonely = entities.require(document, SERVICES, "lonely")
    assert shown["service"] == {"id": lonely["id"]}
    assert shown["created_at"] == NOW and isinstance(shown["created_at"], int)
    target = entities.present(TARGETS, entities.entries(document, "targets")[0])
    assert target["upstream"] == {"id": entities.require(document, UPSTREAMS, "up.internal")["id"]}


# ----------------------------------------------------------------------------------------------
# Writes
# ----------------------------------------------------------------------------------------------


def test_create_generates_and_stores_an_id_and_leaves_the_input_alone(document: dict[str, Any]) -> None:
    before = repr(document)
    written = entities.create(document, SERVICES, {"name": "new", "url": "http://n.internal:81/p"},
                              now=NOW, new_id=ids())
    assert repr(document) == before
    assert written.created and written.entity_id == "00000000-0000-4000-8000-000000000001"
    stored = entities.by_id(valid(written), "services", written.entity_id)
    assert stored is not None
    assert (stored["host"], stored["port"], stored["path"], stored["created_at"]) == ("n.internal", 81, "/p", NOW)


def test_create_under_a_parent_links_it_whatever_the_body_says(document: dict[str, Any]) -> None:
    lonely = entities.require(document, SERVICES, "lonely")
    billing = entities.require(document, SERVICES, "billing")
    written = entities.create(document, ROUTES, {"paths": ["/l"], "service": billing["id"]}, now=NOW,
                              new_id=ids(), scope=Scope("service", lonely["id"]))
    assert entities.by_id(valid(written), "routes", written.entity_id or "")["service"] == lonely["id"]  # type: ignore[index]


@pytest.mark.parametrize(("kind", "body", "key"), [
    (SERVICES, {"name": "billing", "host": "x"}, {"name": "billing"}),
    (ROUTES, {"name": "pay", "paths": ["/other"]}, {"name": "pay"}),
    (UPSTREAMS, {"name": "up.internal"}, {"name": "up.internal"}),
])
def test_unique_names(document: dict[str, Any], kind: entities.Kind, body: dict[str, Any],
                      key: dict[str, Any]) -> None:
    error = refused(entities.create, document, kind, body, now=NOW, new_id=ids())
    assert error.status == 409
    assert error.body == {"code": 5, "name": "unique constraint violation",
                          "message": f"UNIQUE violation detected on '{{name=\"{key['name']}\"}}'", "fields": key}


def test_unique_target_per_upstream_after_normalizing(document: dict[str, Any]) -> None:
    upstream = entities.require(document, UPSTREAMS, "up.internal")
    error = refused(entities.create, document, TARGETS, {"target": "10.0.0.2"}, now=NOW, new_id=ids(),
                    scope=Scope("upstream", upstream["id"]))
    assert error.status == 409
    assert error.body["message"] == (f"UNIQUE violation detected on '{{target=\"10.0.0.2:8000\","
                                     f"upstream={{id=\"{upstream['id']}\"}}}}'")


def test_unique_plugin_per_scope() -> None:
    document = canonical(services=[{"name": "s", "host": "s.internal"}])
    service_id = entities.require(document, SERVICES, "s")["id"]
    document["plugins"] = [{"id": "00000000-0000-4000-8000-0000000000aa", "name": "demo", "service": service_id}]
    error = refused(entities.create, document, PLUGINS, {"name": "demo", "service": {"name": "s"}}, now=NOW,
                    new_id=ids())
    assert error.status == 409
    assert error.body["message"] == (
        f"UNIQUE violation detected on '{{consumer=null,name=\"demo\",route=null,service={{id=\"{service_id}\"}}}}'")
    # Another scope is another plugin.
    entities.create(document, PLUGINS, {"name": "demo"}, now=NOW, new_id=ids())


def test_primary_key_violation(document: dict[str, Any]) -> None:
    existing = entities.require(document, SERVICES, "billing")["id"]
    error = refused(entities.create, document, SERVICES, {"id": existing, "host": "x"}, now=NOW, new_id=ids())
    assert error.status == 400
    assert error.body == {"code": 3, "name": "primary key violation",
                          "message": f"primary key violation on key '{{id=\"{existing}\"}}'",
                          "fields": {"id": existing}}


@pytest.mark.parametrize(("reference", "key"), [
    ("nope", {"name": "nope"}),
    ({"name": "nope"}, {"name": "nope"}),
    ({"id": "5b1c8a2e-4a7e-4d7a-9d9b-0a1b2c3d4e5f"}, {"id": "5b1c8a2e-4a7e-4d7a-9d9b-0a1b2c3d4e5f"}),
    ({"id": "billing"}, {"id": "billing"}),  # an id must be the id, not the name
])
def test_foreign_key_to_nothing(document: dict[str, Any], reference: Any, key: dict[str, str]) -> None:
    error = refused(entities.create, document, ROUTES, {"paths": ["/x"], "service": reference}, now=NOW,
                    new_id=ids())
    assert error.status == 400
    assert error.body["code"] == 4 and error.body["fields"] == {"service": key}
    assert error.body["message"].endswith("does not reference an existing 'services' entity.")


def test_foreign_keys_by_name_are_stored_as_ids(document: dict[str, Any]) -> None:
    written = entities.create(document, ROUTES, {"paths": ["/x"], "service": {"name": "lonely"}}, now=NOW,
                              new_id=ids())
    stored = entities.by_id(written.document, "routes", written.entity_id or "")
    assert stored is not None and stored["service"] == entities.require(document, SERVICES, "lonely")["id"]


def test_patch_merges_fields_and_records(document: dict[str, Any]) -> None:
    upstream = entities.require(document, UPSTREAMS, "up.internal")
    written = entities.update(document, UPSTREAMS, "up.internal",
                              {"slots": 20, "healthchecks": {"active": {"healthy": {"interval": 5}}}}, now=NOW + 5)
    patched = entities.by_id(valid(written), "upstreams", upstream["id"])
    assert patched is not None
    assert patched["slots"] == 20 and patched["healthchecks"]["active"]["healthy"]["interval"] == 5
    assert patched["healthchecks"]["active"]["healthy"]["http_statuses"] == [200, 302]  # kept
    assert patched["healthchecks"]["active"]["timeout"] == 1.0
    assert patched["updated_at"] == NOW + 5


def test_patch_with_url_replaces_what_it_stands_for(document: dict[str, Any]) -> None:
    written = entities.update(document, SERVICES, "billing", {"url": "https://b.internal:8443/v2"}, now=NOW)
    patched = entities.require(valid(written), SERVICES, "billing")
    assert (patched["protocol"], patched["host"], patched["port"], patched["path"]) == (
        "https", "b.internal", 8443, "/v2")


def test_patch_of_nothing_is_not_found(document: dict[str, Any]) -> None:
    assert refused(entities.update, document, SERVICES, "nope", {"retries": 1}, now=NOW).status == 404


def test_put_replaces_the_whole_entity_and_keeps_its_id(document: dict[str, Any]) -> None:
    billing = entities.require(document, SERVICES, "billing")
    patched = entities.update(document, SERVICES, "billing", {"retries": 1}, now=NOW)
    written = entities.upsert(patched.document, SERVICES, "billing", {"host": "other.internal"}, now=NOW + 1,
                              new_id=ids())
    replaced = entities.require(valid(written), SERVICES, "billing")
    assert replaced["id"] == billing["id"] and not written.created
    assert replaced["retries"] == 5  # back to the default: PUT is not PATCH
    assert replaced["created_at"] == NOW and replaced["updated_at"] == NOW + 1


def test_put_creates_by_name_or_by_id(document: dict[str, Any]) -> None:
    by_name = entities.upsert(document, SERVICES, "fresh", {"host": "f.internal", "name": "ignored"}, now=NOW,
                              new_id=ids())
    assert by_name.created and entities.require(valid(by_name), SERVICES, "fresh")["host"] == "f.internal"
    wanted = "5b1c8a2e-4a7e-4d7a-9d9b-0a1b2c3d4e5f"
    by_id = entities.upsert(document, SERVICES, wanted, {"host": "i.internal"}, now=NOW, new_id=ids())
    assert by_id.entity_id == wanted and entities.by_id(valid(by_id), "services", wanted) is not None


def test_put_of_a_target_by_its_address(document: dict[str, Any]) -> None:
    upstream = entities.require(document, UPSTREAMS, "up.internal")
    scope = Scope("upstream", upstream["id"])
    written = entities.upsert(document, TARGETS, "10.0.0.9:81", {"weight": 5}, now=NOW, new_id=ids(), scope=scope)
    target = entities.require(valid(written), TARGETS, "10.0.0.9:81", scope)
    assert target["weight"] == 5 and target["upstream"] == upstream["id"]


def test_delete_restricted_by_routes_then_cascading_to_plugins(document: dict[str, Any]) -> None:
    error = refused(entities.delete, document, SERVICES, "billing")
    assert error.status == 400
    assert error.body == {"code": 4, "name": "foreign key violation",
                          "message": "an existing 'routes' entity references this 'services' entity",
                          "fields": {"@referenced_by": "routes"}}
    lonely = entities.require(document, SERVICES, "lonely")["id"]
    document["plugins"] = [{"id": "00000000-0000-4000-8000-0000000000aa", "name": "demo", "service": lonely},
                           {"id": "00000000-0000-4000-8000-0000000000bb", "name": "demo"}]
    written = entities.delete(document, SERVICES, "lonely")
    assert written is not None
    assert [item["name"] for item in written.document["services"]] == ["billing"]
    assert [item["id"] for item in written.document["plugins"]] == ["00000000-0000-4000-8000-0000000000bb"]


def test_deleting_an_upstream_deletes_its_targets(document: dict[str, Any]) -> None:
    written = entities.delete(document, UPSTREAMS, "up.internal")
    assert written is not None and valid(written)["targets"] == [] and written.document["upstreams"] == []


def test_deleting_nothing_is_no_change(document: dict[str, Any]) -> None:
    assert entities.delete(document, ROUTES, "nope") is None


# ----------------------------------------------------------------------------------------------
# Pages
# ----------------------------------------------------------------------------------------------


def test_pages_walk_every_entity_once() -> None:
    items = [{"id": str(n)} for n in range(7)]
    seen, offset, pages = [], None, 0
    while True:
        page = entities.page(items, "3", offset)
        seen += [item["id"] for item in page.data]
        pages += 1
        if page.offset is None:
            break
        offset = page.offset
    assert seen == [str(n) for n in range(7)] and pages == 3
    assert len(entities.page(items * 200, None, None).data) == 100  # Kong's default size
    assert len(entities.page(items * 200, "1000", None).data) == 1000


@pytest.mark.parametrize(("size", "message"), [
    ("0", "size must be an integer between 1 and 1000"),
    ("1001", "size must be an integer between 1 and 1000"),
    ("2.5", "size must be an integer between 1 and 1000"),
    ("ten", "size must be a number"),
])
def test_bad_sizes(size: str, message: str) -> None:
    error = refused(entities.page, [], size, None)
    assert error.status == 400 and error.body == {"code": 9, "name": "invalid size", "message": message}


@pytest.mark.parametrize("offset", ["!!!", "bm9wZQ", entities.encode_offset(3) + "x"])
def test_bad_offsets(offset: str) -> None:
    error = refused(entities.page, [], None, offset)
    assert error.status == 400
    assert error.body == {"code": 7, "name": "invalid offset",
                          "message": f"'{offset}' is not a valid offset: bad base64 encoding"}
