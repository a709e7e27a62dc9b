"""Text that can be stored, sent and shown whatever characters or bytes it came with.

PostgreSQL text cannot hold NUL (``CharacterNotInRepertoire``) nor a lone surrogate (what a byte
that is not UTF-8 becomes when decoded with ``surrogateescape``, see ``consumers.nats.safety``);
NATS headers cannot hold CR/LF; terminals and CSV readers act on control characters. A refused
input's detail and subject go through :func:`printable` before they are stored or published, so
that every refusal is recorded on its first delivery (issue 13), and :func:`unprintable` gives the
original bytes back.
"""

from __future__ import annotations

_HEX = frozenset("0123456789abcdefABCDEF")


def printable(text: str, *, reversible: bool = True) -> str:
    """``text`` with what cannot be stored as PostgreSQL text, sent as a NATS header or shown on a
    terminal escaped as Python escapes it: C0 controls and DEL as ``\\xNN`` (``\\x00``, ``\\x1b``),
    other characters that are not printable (C1, bidi controls, separators) as ``\\uNNNN``, a byte
    that was not UTF-8 (a lone surrogate from the surrogateescape decode) as ``\\xNN`` of that byte,
    and a backslash as ``\\\\``, so the form is unambiguous: :func:`unprintable` gives the original
    bytes back. Everything else (printable Unicode) is kept as is.

    ``reversible=False`` keeps backslashes as they are: for text meant to be read, not decoded (a
    rejection's detail quotes JSON escapes such as ``\\u0000`` that should not be doubled)."""
    if text.isprintable() and (not reversible or "\\" not in text):
        return text  # the common case, fast
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch == "\\" and reversible:
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape of the byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:  # C0 and DEL: the same value as a byte
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable():  # C1, other surrogates, separators, bidi controls...
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def unprintable(text: str) -> bytes:
    """The bytes :func:`printable` came from (its escapes undone; the rest encoded as UTF-8)."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            kind = text[i + 1]
            if kind == "\\":
                out += b"\\"
                i += 2
                continue
            width = {"x": 2, "u": 4, "U": 8}.get(kind)
            digits = text[i + 2 : i + 2 + width] if width is not None else ""
            if width is not None and len(digits) == width and all(c in _HEX for c in digits):
                code = int(digits, 16)
                if kind == "x" or code <= 0x10FFFF:
                    out += bytes([code]) if kind == "x" else chr(code).encode("utf-8", "surrogatepass")
                    i += 2 + width
                    continue
        out += ch.encode("utf-8", "surrogateescape")
        i += 1
    return bytes(out)


def storable(text: str) -> str:
    """``text`` as is if PostgreSQL text and NATS headers can hold it (no NUL, CR, LF, no lone
    surrogate), else :func:`printable` of it. For text that is usually clean (a detail already made
    printable by the parser): never escapes twice what needs no escaping."""
    if "\x00" not in text and "\r" not in text and "\n" not in text and not _has_surrogate(text):
        return text
    return printable(text, reversible=False)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
