"""normalize_path and escape_upstream_path against Kong's rules (kong-spec §2)."""
from __future__ import annotations

import random
import re

import pytest

from fastpath.router import escape_upstream_path, normalize_path

RESERVED = "!*'();:@&=+$,/?%#[]"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/index.html", "/index.html"),
        ("/a/..b/c./.d", "/a/..b/c./.d"),
        # dot-segments
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/../../b", "/b"),
        ("/..", "/"),
        ("/.", "/"),
        ("/./", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/../", "/a/"),
        ("/a/./../b/./c/..", "/b/"),
        # "//" merged
        ("//", "/"),
        ("//a//b//", "/a/b/"),
        ("/a/..//b", "/b"),
        ("/a/.//", "/a/"),
        # decoding of unreserved and "other" characters
        ("/%41%62", "/Ab"),
        ("/%7e%2D%5f%2E", "/~-_."),
        ("/a%20b", "/a b"),
        ("/caf%C3%A9", "/café"),
        ("/caf%c3%a9", "/café"),
        ("/%E2%82%AC", "/€"),
        ("/%FF", "/\udcff"),
        # reserved characters stay encoded, hex uppercased
        ("/a%2fb", "/a%2Fb"),
        ("/a%2Fb", "/a%2Fb"),
        ("/%25", "/%25"),
        ("/%2541", "/%2541"),
        ("/a%2F..%2Fb", "/a%2F..%2Fb"),
        # decoded dots take part in dot-segment removal
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E/b", "/a/b"),
        ("/a/.%2e", "/"),
        # the input may already carry decoded non-ASCII characters
        ("/café/../x", "/x"),
        ("/é%41", "/éA"),
    ],
)
def test_normalize_table(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("char", list(RESERVED))
def test_every_reserved_character_stays_encoded_with_upper_hex(char: str) -> None:
    hex_lower = f"{ord(char):02x}"
    assert normalize_path(f"/x%{hex_lower}y") == f"/x%{hex_lower.upper()}y"


@pytest.mark.parametrize("raw", ["/%zz", "/%4", "/%", "/a%g1", "/%%41", "/abc%", "/%1"])
def test_malformed_escape_raises(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["", "a/b", "*", "%2F"])
def test_path_must_start_with_slash(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_path(raw)


@pytest.mark.parametrize("raw", ["/", "/a/b/c", "/index.html", "/a/..b", "/v1/users/42/"])
def test_already_normal_path_is_returned_as_is(raw: str) -> None:
    assert normalize_path(raw) is raw


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b", "/a/b"),
        ("/a b", "/a%20b"),
        ("/café", "/caf%C3%A9"),
        ("/\udcff", "/%FF"),
        ("/a\\b", "/a%5Cb"),
        ('/"<>^`{|}', "/%22%3C%3E%5E%60%7B%7C%7D"),
        ("/!#$&'()*+,/:;=?@[]-_.~%41", "/!#$&'()*+,/:;=?@[]-_.~%41"),
    ],
)
def test_escape_upstream_path(path: str, expected: str) -> None:
    assert escape_upstream_path(path) == expected


def test_escape_returns_safe_input_as_is() -> None:
    path = "/v1/users/42"
    assert escape_upstream_path(path) is path


# ---------------------------------------------------------------------------
# Randomized comparison with a reference written straight from RFC 3986 §5.2.4


def _reference_decode(raw: str) -> str:
    def decode(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        return "%" + m.group(1).upper() if chr(byte) in RESERVED else f"\x00{byte:02x}"

    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        raise ValueError(raw)
    marked = re.sub(r"%([0-9A-Fa-f]{2})", decode, raw)
    data = bytearray()
    i = 0
    while i < len(marked):
        if marked[i] == "\x00":
            data.append(int(marked[i + 1 : i + 3], 16))
            i += 3
        else:
            data += marked[i].encode("utf-8", "surrogateescape")
            i += 1
    return data.decode("utf-8", "surrogateescape")


def _reference_remove_dots(path: str) -> str:
    # RFC 3986 5.2.4, with "//" merged as Kong does (merge_slashes = true)
    buffer, output = path, []
    while buffer:
        if buffer.startswith("../"):
            buffer = buffer[3:]
        elif buffer.startswith("./"):
            buffer = buffer[2:]
        elif buffer.startswith("/./"):
            buffer = buffer[2:]
        elif buffer == "/.":
            buffer = "/"
        elif buffer.startswith("/../"):
            buffer = buffer[3:]
            if output:
                output.pop()
        elif buffer == "/..":
            buffer = "/"
            if output:
                output.pop()
        elif buffer in (".", ".."):
            buffer = ""
        elif buffer.startswith("//"):
            buffer = buffer[1:]
        else:
            cut = buffer.find("/", 1)
            cut = len(buffer) if cut < 0 else cut
            output.append(buffer[:cut])
            buffer = buffer[cut:]
    return "".join(output) or "/"


def _reference_normalize(raw: str) -> str:
    return _reference_remove_dots(_reference_decode(raw))


def test_randomized_against_rfc_reference() -> None:
    rng = random.Random(20240611)
    pieces = ["/", "/", ".", "..", "a", "b", "é", "%2e", "%2E", "%2f", "%41", "%c3%a9", "%ff", "%20", "%25", "-"]
    checked = 0
    for _ in range(5000):
        raw = "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        expected = _reference_normalize(raw)
        result = normalize_path(raw)
        assert result == expected, raw
        # normalizing twice changes nothing, and nothing dotted or doubled is left
        assert normalize_path(result) == result
        assert "//" not in result and "/./" not in result and "/../" not in result
        checked += 1
    assert checked == 5000


def test_randomized_malformed_escapes_agree_with_reference() -> None:
    rng = random.Random(7)
    pieces = ["a", "/", "%", "%4", "%zz", "%41", "1", "g"]
    for _ in range(2000):
        raw = "/" + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        try:
            expected: str | None = _reference_normalize(raw)
        except ValueError:
            expected = None
        if expected is None:
            with pytest.raises(ValueError):
                normalize_path(raw)
        else:
            assert normalize_path(raw) == expected, raw


def test_escape_round_trips_through_normalize() -> None:
    rng = random.Random(99)
    alphabet = "ab/ é€\udcff\"<>%{}"
    for _ in range(2000):
        text = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        escaped = escape_upstream_path(text)
        assert escaped.isascii()
        assert re.fullmatch(r"[!#$&'()*+,/:;=?@\[\]A-Za-z0-9\-_.~%]*", escaped)
        # the wire form decodes back to the text, except that a bare "%" stays as sent
        if "%" not in text:
            assert _reference_decode(escaped) == text
