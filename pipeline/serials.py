"""Certificate serial numbers as text: upper-case hex with an even number of digits, the way
``openssl x509 -serial`` and ``openssl crl -text`` print them (a leading ``0`` where the
number has an odd number of hex digits). Every serial provline writes (the journal, the
audit log, ``device.json``, ``report.json``, the inventory, renewals, fixture logs) uses
:func:`serial_hex`; everything that reads one accepts older odd-length and lower-case text
too (:func:`canonical_serial`, :func:`same_serial`)."""

from __future__ import annotations


def serial_hex(number: int) -> str:
    """``number`` as openssl prints a serial: upper-case hex, an even number of digits."""
    if number < 0:
        raise ValueError("a certificate serial is not negative")
    text = format(number, "X")
    return text if len(text) % 2 == 0 else "0" + text


def canonical_serial(text: str) -> str:
    """Any hex serial text (odd length, lower case, ``:`` or space separated, leading zeros)
    as :func:`serial_hex` writes it; raises ValueError if it is not hex."""
    cleaned = text.replace(":", "").replace(" ", "").strip()
    if not cleaned:
        raise ValueError("an empty serial")
    return serial_hex(int(cleaned, 16))


def same_serial(a: str | None, b: str | None) -> bool:
    """Whether two serial texts name the same number (an older provline wrote odd-length
    serials: ``ABC`` and ``0ABC`` are the same certificate)."""
    if not a or not b:
        return False
    try:
        return canonical_serial(a) == canonical_serial(b)
    except ValueError:
        return a == b
