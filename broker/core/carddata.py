"""The one card-number detector (PCI DSS 3.3.1, 3.4.1), for the card guard and the log redactor.

The guard refuses what it finds; the redactor masks it. Text is folded before it is searched:
NFKC, every Unicode decimal digit as its ASCII digit, every other character that is neither a
letter nor a digit as a separator, and (for URLs) percent escapes decoded. A card number is
then a run of digit groups joined by short runs of separators (or a card printed in its
groups with the same whitespace between them, line breaks included), 13 to 19 digits long,
with a card network's leading digits and a valid Luhn check digit. Digits glued to letters
count too; only long hexadecimal tokens (hashes, API keys), UUIDs and IBANs are set aside, so
that ordinary identifiers are not mistaken for cards.
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
# A single colon still joins two groups of four digits or more ("4242:4242:4242:4242"): no
# time, date or address:port has such groups on both sides of one.
_COLON = r"(?<=[0-9]{4}):(?=[0-9]{4})"
_CHAIN = re.compile(rf"[0-9]+(?:(?:{_GAP}{{1,3}}|{_COLON})[0-9]+)*")
# A card printed in its own groups (4-4-4-4, Amex 4-6-5) with the same whitespace between
# every group joins across longer runs and line breaks too: "4242\n4242\n4242\n4242" in a
# text field, or groups padded into columns. The repeated separator keeps lines of numbers
# apart.
_PRINTED = re.compile(
    r"(?<![0-9])[0-9]{4}(\s{1,16})(?:[0-9]{4}\1[0-9]{4}\1[0-9]{4}|[0-9]{6}\1[0-9]{5})(?![0-9])"
)
_GROUP = re.compile(r"[0-9]+")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# An IBAN: country, check digits, then 11 to 30 letters or digits, grouped or not.
_IBAN = re.compile(r"(?<![0-9A-Za-z])[A-Za-z]{2}[0-9]{2}(?:[ -]?[0-9A-Za-z]){11,30}")
_MIN_IBAN = 15
# A hexadecimal token of 16 characters or more is a hash, a key or an id (trace and span ids
# are 16 or 32, MongoDB ids 24): a digit run in it is chance, not a card with letters glued to
# it. Random 16-character ids would otherwise be refused about once in 4,000.
_HEX_TOKEN = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f]{16,}(?![0-9A-Za-z])")
_SPECIAL = re.compile(r"[^\x00-\x7f]")
_SPECIAL_URL = re.compile(r"[^\x00-\x7f]|(?:%[0-9A-Fa-f]{2})+")
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


def _fold(text: str, *, url: bool, spans: bool) -> tuple[str, list[tuple[int, int]] | None]:
    """The folded text, and (with `spans`) for each of its characters the span of `text` it
    came from; None when folding changed nothing.

    Plain ASCII passes through whole: only other characters and percent escapes are
    folded, so a large body costs a few regular-expression passes, not a loop per character.
    """
    special = _SPECIAL_URL if url else _SPECIAL
    if text.isascii() and not (url and "%" in text):
        return text, None
    folded: list[str] = []
    mapping: list[tuple[int, int]] = []
    done = 0
    for match in special.finditer(text):
        if match.start() > done:
            folded.append(text[done : match.start()])
            if spans:
                mapping.extend((i, i + 1) for i in range(done, match.start()))
        found = match.group()
        if found.startswith("%"):
            # Percent escapes are bytes; a multi-byte character is decoded whole.
            decoded = bytes.fromhex(found.replace("%", "")).decode("utf-8", errors="replace")
            piece = "".join(_fold_char(c) for c in decoded)
        else:
            piece = _fold_char(found)
        folded.append(piece)
        if spans:
            mapping.extend([(match.start(), match.end())] * len(piece))
        done = match.end()
    folded.append(text[done:])
    if spans:
        mapping.extend((i, i + 1) for i in range(done, len(text)))
    return "".join(folded), mapping if spans else None


def _iban_end(candidate: str) -> int | None:
    """The end of the longest checksum-valid IBAN at the start of `candidate`, if any."""
    head = candidate[:4].upper()
    head_digits = "".join(str(int(c, 36)) for c in head)
    head_value, head_scale = int(head_digits), pow(10, len(head_digits), 97)
    # mod-97 of the rearranged IBAN (BBAN then the first four), kept as the BBAN grows.
    remainder, length, found = 0, 4, None
    for position in range(4, len(candidate)):
        char = candidate[position]
        if char in " -":
            continue
        value = int(char, 36)
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
        length += 1
        if length >= _MIN_IBAN and (remainder * head_scale + head_value) % 97 == 1:
            found = position + 1
    return found


def _mask_identifiers(text: str) -> str:
    """`text` with UUIDs, long hex tokens and valid IBANs turned into breaks.

    No card is looked for in them: a digit run in a hash or a key is chance, and an IBAN
    is a bank account, whose own check digits say so.
    """
    text = _UUID.sub(lambda m: "\n" * len(m.group()), text)
    text = _HEX_TOKEN.sub(
        lambda m: m.group() if m.group().isdigit() else "\n" * len(m.group()), text
    )
    return _IBAN.sub(_mask_iban, text)


def _mask_iban(match: re.Match[str]) -> str:
    end = _iban_end(match.group())
    if end is None:
        return match.group()
    return "\n" * end + match.group()[end:]


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
    # A card needs a run of at least 13 characters or one printed in its groups, and masking
    # identifiers only breaks runs apart: text with neither (most headers, a JWT's base64) is
    # done in one pass.
    short = all(chain.end() - chain.start() < _MIN_PAN for chain in _CHAIN.finditer(folded))
    if short and not _PRINTED.search(folded):
        return
    masked = _mask_identifiers(folded)
    hits: list[tuple[int, int]] = []
    for chain in _CHAIN.finditer(masked):
        if chain.end() - chain.start() < _MIN_PAN:
            continue
        groups = [
            (chain.start() + m.start(), chain.start() + m.end())
            for m in _GROUP.finditer(chain.group())
        ]
        hits.extend(_chain_hits(masked, groups))
    for printed in _PRINTED.finditer(masked):
        start, end = printed.span()
        overlaps = any(start < hit_end and hit_start < end for hit_start, hit_end in hits)
        if not overlaps and looks_like_pan("".join(_GROUP.findall(printed.group()))):
            hits.append((start, end))
    yield from sorted(hits)


def contains_card_number(text: str, *, url: bool = False) -> bool:
    """True when `text` holds a card number in any notation; `url` also decodes percent escapes."""
    if len(text) < _MIN_PAN:
        return False
    folded, _ = _fold(text, url=url, spans=False)
    return next(_hits(folded), None) is not None


def redact_card_numbers(text: str, replacement: str, *, url: bool = True) -> str:
    """`text` with every card number in it, in any notation, replaced by `replacement`."""
    if len(text) < _MIN_PAN:
        return text
    folded, spans = _fold(text, url=url, spans=True)
    hits = list(_hits(folded))
    if not hits:
        return text
    if spans is not None:
        hits = [(spans[start][0], spans[end - 1][1]) for start, end in hits]
    pieces, done = [], 0
    for start, end in hits:
        pieces += [text[done:start], replacement]
        done = end
    return "".join([*pieces, text[done:]])


def normalise(text: str) -> str:
    """`text` in NFKC, with every Unicode decimal digit as its ASCII digit and no format characters.

    Validators apply this before they check a value, so that the value they check is the
    value they keep.
    """
    if text.isascii():
        return text  # ASCII is NFKC already, and holds no other digits and no format characters
    text = unicodedata.normalize("NFKC", text)
    return "".join(
        str(unicodedata.decimal(c))
        if not c.isascii() and c.isdecimal()
        else ("" if unicodedata.category(c) == "Cf" else c)
        for c in text
    )
