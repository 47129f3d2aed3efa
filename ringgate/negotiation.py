"""Kong's content negotiation for the answers the gateway writes itself (errors, plugin answers)."""
from __future__ import annotations


def prefers_text(accept: str | None) -> bool:
    """Kong answers JSON unless the client's Accept prefers text/plain (or text/html) over JSON."""
    if not accept:
        return False
    best_kind, best_q = "json", -1.0
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media in ("application/json", "*/*", "application/*"):
            kind = "json"
        elif media in ("text/plain", "text/*", "text/html"):
            kind = "text"
        else:
            continue
        if q > best_q:
            best_kind, best_q = kind, q
    return best_kind == "text"
