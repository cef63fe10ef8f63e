"""The one card-number detector (PCI DSS 3.3.1, 3.4.1): the guard refuses what it finds, the log
redactor masks it.

Text is folded before it is searched: NFKC, every Unicode decimal digit as its ASCII digit, every
other character that is neither a letter nor a digit as a separator, and (for URLs) percent
escapes decoded. A card number is then a run of digit groups joined by short runs of separators,
13 to 19 digits long, with a card network's leading digits and a valid Luhn check digit. Digits
glued to letters count too; only long hexadecimal tokens (hashes, API keys), UUIDs and IBANs are
set aside, so that ordinary identifiers are not mistaken for cards.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Final

_MIN_PAN, _MAX_PAN = 13, 19
# Leading digits of the networks PCI DSS covers: Mastercard 2-series (2221-2720) and Mir
# (2200-2204), 3 (Amex, Diners, JCB), 4 (Visa), 5 (Mastercard, Maestro), 6 (Discover,
# UnionPay, Maestro, RuPay), 81/82 (UnionPay, RuPay). Excluding the rest keeps
# epoch-millisecond timestamps (leading 1), compact dates (20xx...) and SIM ICCIDs (89...,
# Luhn-valid by design) from being taken for cards.
_PAN_PREFIX = re.compile(r"^(?:2[2-7]|[3-6]|8[12])")
# After a "+" a run of up to 15 digits is an E.164 phone number, unless it starts like an
# Amex or Diners card: the countries those prefixes name (Spain, the Baltics, Hungary,
# Greece, Ukraine, ...) have no phone number that long.
_MAX_E164 = 15
_CARD_NOT_PHONE: Final = ("30", "34", "36", "37", "38")
# Printed cards group digits in 4s (Amex 4-6-5). Inside a run longer than any card (a card
# pasted with its expiry and CVC), spans are tried only over groups of 3 digits or more:
# one- or two-digit groups are dates and expiries ("12 25") and must not stitch numbers.
_MIN_GROUP = 3
# A separator is anything but a letter, a digit, a colon or a line break, up to 3 in a row
# ("4242 - 4242", "4242\u200b 4242"). Colons are left out so that times ("23:59:59.123456")
# never join a date into a 16-digit run; line breaks so that lines of numbers stay apart.
_BREAKS = ":\n\r\x0b\x0c\x1c\x1d\x1e"
_GAP = rf"[^0-9A-Za-z{re.escape(_BREAKS)}]"
_CHAIN = re.compile(rf"[0-9]+(?:{_GAP}{{1,3}}[0-9]+)*")
_GROUP = re.compile(r"[0-9]+")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_IBAN_START = re.compile(r"(?<![0-9A-Za-z])[A-Za-z]{2}[0-9]{2}")
_IBAN_PART = re.compile(r"[ -]?[0-9A-Za-z]")
_MIN_IBAN, _MAX_IBAN = 15, 34
# A hexadecimal token this long is a hash, a key or an id (MongoDB ids are 24): a digit run in
# it is chance, not a card with letters glued to it.
_MIN_HEX_TOKEN = 24
_HEX = frozenset("0123456789abcdefABCDEF")
_PERCENT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_UNICODE_BREAKS = frozenset("\x85\u2028\u2029")


def luhn_valid(digits: str) -> bool:
    """True when `digits` (ASCII digits only) passes the Luhn mod-10 check."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_checksum_valid(iban: str) -> bool:
    """ISO 13616 / ISO 7064 mod-97-10: the rearranged IBAN, letters as 10..35, is 1 mod 97."""
    if not iban.isascii() or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    remainder = 0
    for char in rearranged.upper():
        # int(char, 36) maps 0-9 to themselves and A-Z to 10..35, as the standard does.
        value = int(char, 36)
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
    return remainder == 1


def looks_like_pan(digits: str) -> bool:
    """True when `digits` (ASCII digits only) has a card number's length, prefix and Luhn digit."""
    return (
        _MIN_PAN <= len(digits) <= _MAX_PAN
        and _PAN_PREFIX.match(digits) is not None
        and luhn_valid(digits)
    )


def _fold_char(char: str) -> str:
    """`char` as the detector sees it: ASCII digits, letters, separators and breaks."""
    if char.isascii():
        return char
    out = []
    for part in unicodedata.normalize("NFKC", char):
        if part.isascii():
            out.append(part)
        elif part.isdecimal():
            out.append(str(unicodedata.decimal(part)))
        elif part.isalpha():
            out.append("z")  # a letter, and not a hexadecimal one
        elif part in _UNICODE_BREAKS:
            out.append("\n")
        else:
            out.append(" ")  # NBSP, zero-width and format characters, other punctuation
    return "".join(out)


def _fold(text: str, *, url: bool) -> tuple[str, list[tuple[int, int]] | None]:
    """The folded text, and for each of its characters the span of `text` it came from.

    The spans are None when folding changed nothing (plain ASCII, the common case).
    """
    if text.isascii() and not (url and "%" in text):
        return text, None
    folded: list[str] = []
    spans: list[tuple[int, int]] = []
    index = 0
    while index < len(text):
        escaped = _PERCENT_RUN.match(text, index) if url and text[index] == "%" else None
        if escaped is not None:
            # Percent escapes are bytes; a multi-byte character is decoded whole.
            raw = bytes.fromhex(escaped.group().replace("%", ""))
            piece = "".join(_fold_char(c) for c in raw.decode("utf-8", errors="replace"))
            end = escaped.end()
        else:
            piece = _fold_char(text[index])
            end = index + 1
        folded.append(piece)
        spans.extend([(index, end)] * len(piece))
        index = end
    return "".join(folded), spans


def _mask_identifiers(text: str) -> str:
    """`text` with UUIDs and checksum-valid IBANs turned into breaks, so no card is seen in them."""
    text = _UUID.sub(lambda m: "\n" * len(m.group()), text)
    for start in _IBAN_START.finditer(text):
        ends = []
        position, length = start.end(), 4
        while length < _MAX_IBAN and (part := _IBAN_PART.match(text, position)) is not None:
            position, length = part.end(), length + 1
            if length >= _MIN_IBAN:
                ends.append(position)
        for end in reversed(ends):
            compact = re.sub(r"[ -]", "", text[start.start() : end])
            if iban_checksum_valid(compact):
                text = text[: start.start()] + "\n" * (end - start.start()) + text[end:]
                break
    return text


def _in_hex_token(text: str, start: int, end: int) -> bool:
    """True when the digits at start:end are part of a long hexadecimal token with letters."""
    while start > 0 and text[start - 1].isascii() and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isascii() and text[end].isalnum():
        end += 1
    token = text[start:end]
    return len(token) >= _MIN_HEX_TOKEN and all(c in _HEX for c in token) and not token.isdigit()


def _phone_led(text: str, start: int) -> bool:
    """True when the digits at `start` follow a "+" that starts a phone number."""
    return start > 0 and text[start - 1] == "+" and (start == 1 or not text[start - 2].isalnum())


def _chain_hits(text: str, groups: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The spans of `text` holding a card number within one run of digit groups."""
    if len(groups) == 2 and text[groups[0][1] : groups[1][0]] == ".":
        # One dot between two groups is a decimal number, whose halves are checked alone.
        for group in groups:
            yield from _chain_hits(text, [group])
        return
    digits = "".join(text[start:end] for start, end in groups)
    if (
        _phone_led(text, groups[0][0])
        and len(digits) <= _MAX_E164
        and not digits.startswith(_CARD_NOT_PHONE)
    ):
        return
    if looks_like_pan(digits):
        yield groups[0][0], groups[-1][1]
        return
    # "4242 4242 4242 4242 12 25 123" is a card pasted with its expiry and CVC: try every
    # span of whole groups, between the short groups.
    start = 0
    while start < len(groups):
        joined = ""
        for end in range(start, len(groups)):
            digits = text[groups[end][0] : groups[end][1]]
            if len(digits) < _MIN_GROUP or len(joined) + len(digits) > _MAX_PAN:
                break
            joined += digits
            if looks_like_pan(joined):
                yield groups[start][0], groups[end][1]
                start = end
                break
        start += 1


def _hits(folded: str) -> Iterator[tuple[int, int]]:
    masked = _mask_identifiers(folded)
    for chain in _CHAIN.finditer(masked):
        groups = [
            (chain.start() + m.start(), chain.start() + m.end())
            for m in _GROUP.finditer(chain.group())
        ]
        if _in_hex_token(masked, *groups[-1]):
            groups.pop()
        if groups and _in_hex_token(masked, *groups[0]):
            groups.pop(0)
        if groups:
            yield from _chain_hits(masked, groups)


def contains_card_number(text: str, *, url: bool = False) -> bool:
    """True when `text` holds a card number in any notation; `url` also decodes percent escapes."""
    if len(text) < _MIN_PAN:
        return False
    folded, _ = _fold(text, url=url)
    return next(_hits(folded), None) is not None


def redact_card_numbers(text: str, replacement: str, *, url: bool = True) -> str:
    """`text` with every card number in it, in any notation, replaced by `replacement`."""
    if len(text) < _MIN_PAN:
        return text
    folded, spans = _fold(text, url=url)
    hits = list(_hits(folded))
    if spans is not None:
        hits = [(spans[start][0], spans[end - 1][1]) for start, end in hits]
    for start, end in reversed(hits):
        text = text[:start] + replacement + text[end:]
    return text


def normalise(text: str) -> str:
    """`text` in NFKC, with every Unicode decimal digit as its ASCII digit and no format characters.

    Validators apply this before they check a value, so that the value they check is the
    value they keep.
    """
    text = unicodedata.normalize("NFKC", text)
    return "".join(
        str(unicodedata.decimal(c))
        if not c.isascii() and c.isdecimal()
        else ("" if unicodedata.category(c) == "Cf" else c)
        for c in text
    )
