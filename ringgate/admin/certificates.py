"""Kong's `snis` pseudo-field of certificates, as pure functions over the declarative document.

In the Admin API a certificate carries the names it is served for: `POST /certificates` with
`snis: ["a.com", "b.com"]` creates the certificate and one `snis` entity per name, and every
answer about a certificate lists its SNIs' names, sorted. In the document the SNIs stay their
own collection (each with a `certificate` reference), as in kong.yml.

Kong's rules (kong/db/dao/certificates.lua, snis.lua): a name given twice in the list is a schema
violation ("x is duplicated"); a name already served by another certificate is one too ("x already
associated with existing certificate '<id>'"); PATCH without `snis` keeps the SNIs, with `snis`
makes them exactly the list; PUT replaces the whole entity, so PUT without `snis` removes them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from pydantic import TypeAdapter, ValidationError

from ringgate.admin import errors
from ringgate.admin.entities import EntityData, Written, entries
from ringgate.config.schema import WildcardSni

FIELD: Final = "snis"
_NAME: Final = TypeAdapter(WildcardSni)


def take_names(body: EntityData) -> list[str] | None:
    """Remove the pseudo-field from `body`: its names, sorted, or None when it was not given.

    A single name (a form's `snis=a.com`) counts as a one-name list, null as the empty list."""
    if FIELD not in body:
        return None
    given: Any = body.pop(FIELD)
    if given is None:
        return []
    names = [given] if isinstance(given, str) else given
    if not isinstance(names, list):
        raise errors.schema_violation({FIELD: "expected an array"})
    problems: dict[int, str] = {}
    for index, name in enumerate(names):
        reason = _name_problem(name)
        if reason is not None:
            problems[index] = reason
    if problems:
        raise errors.schema_violation({FIELD: [problems.get(index) for index in range(max(problems) + 1)]})
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise errors.schema_violation({FIELD: f"{name} is duplicated"})
        seen.add(name)
    return sorted(names)


def _name_problem(name: Any) -> str | None:
    try:
        _NAME.validate_python(name)
    except ValidationError as exc:
        detail = exc.errors()[0]
        return "expected a string" if detail["type"] == "string_type" else str(detail["msg"])
    return None


def with_names(written: Written, names: list[str] | None, *, now: int, new_id: Callable[[], str]) -> Written:
    """Make the written certificate's SNIs exactly `names` (None: leave them as they are)."""
    if names is None:
        return written
    certificate_id = written.entity_id
    document = written.document
    snis = entries(document, "snis")
    for name in names:
        holder = next((item for item in snis if item.get("name") == name), None)
        if holder is not None and holder.get("certificate") != certificate_id:
            raise errors.schema_violation(
                {FIELD: f"{name} already associated with existing certificate '{holder.get('certificate')}'"})
    wanted = set(names)
    kept = [item for item in snis if item.get("certificate") != certificate_id or item.get("name") in wanted]
    present = {item.get("name") for item in kept if item.get("certificate") == certificate_id}
    added = [{"id": new_id(), "name": name, "certificate": certificate_id, "created_at": now, "updated_at": now}
             for name in names if name not in present]
    return replace(written, document={**document, "snis": kept + added})

