"""Card numbers in every notation a client might send them, for the guard and redaction tests."""

from __future__ import annotations

PAN = "4242424242424242"
AMEX = "378282246310005"


def in_digits(text: str, zero: str) -> str:
    """`text` with its ASCII digits written in the script whose zero is `zero`."""
    return "".join(chr(ord(zero) + int(c)) if c.isdigit() else c for c in text)


def grouped(pan: str, sep: str, size: int = 4) -> str:
    """`pan` in groups of `size` digits joined by `sep`."""
    return sep.join(pan[i : i + size] for i in range(0, len(pan), size))


VARIANTS = {
    "fullwidth": in_digits(PAN, "\uff10"),
    "arabic-indic": in_digits(PAN, "\u0660"),
    "eastern-arabic-indic": in_digits(PAN, "\u06f0"),
    "devanagari": in_digits(PAN, "\u0966"),
    "bengali": in_digits(PAN, "\u09e6"),
    "mathematical-bold": in_digits(PAN, "\U0001d7ce"),
    "mixed-scripts": in_digits(PAN[:8], "\u0660") + PAN[8:],
    "dots": grouped(PAN, "."),
    "slashes": grouped(PAN, "/"),
    "underscores": grouped(PAN, "_"),
    "colons": grouped(PAN, ":"),
    "nbsp": grouped(PAN, "\u00a0"),
    "narrow-nbsp": grouped(PAN, "\u202f"),
    "tabs": grouped(PAN, "\t"),
    "zero-width-space": "\u200b".join(PAN),
    "zero-width-joiner": grouped(PAN, "\u200d"),
    "soft-hyphen": grouped(PAN, "\u00ad"),
    "double-spaces": grouped(PAN, "  "),
    "padded-columns": grouped(PAN, "      "),
    "one-group-a-line": grouped(PAN, "\n"),
    "amex-a-line": "\r\n".join((AMEX[:4], AMEX[4:10], AMEX[10:])),
    "spaced-dash": grouped(PAN, " - "),
    "groups-of-2": grouped(PAN, " ", 2),
    "groups-of-5": grouped(PAN, " ", 5),
    "uneven-groups": "42 4242 4242 4242 42",
    "every-digit": " ".join(PAN),
    "glued-before": "card" + PAN,
    "glued-after": PAN + "exp",
    "glued-both": "x" + PAN + "y",
    "after-plus": "+" + PAN,
    "amex-after-plus": "+" + AMEX,
    "plus-separated": grouped(PAN, "+"),
    "fullwidth-separators": grouped(in_digits(PAN, "\uff10"), "\uff0d"),
    "in-prose": f"please charge {grouped(PAN, '.')} today",
}
