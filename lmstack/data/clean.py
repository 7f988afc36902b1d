"""Text cleaning: Unicode normalisation, whitespace fixes and PII scrubbing.

Cleaning rewrites a document's text and never drops it (dropping is for ``filters``).
PII scrubbing is a list of scrubbers, each ``text -> (text, n_replaced)``: the built-in ones
replace e-mail addresses, IP addresses and phone numbers by ``<EMAIL>``, ``<IP>``,
``<PHONE>``; a caller of the pipeline may pass its own. The regexes aim at the common
written forms; they are not a guarantee that no personal data is left (names, street
addresses and ids in other formats are deliberately not attempted).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Scrubber = Callable[[str], tuple[str, int]]


@dataclass
class CleanConfig:
    unicode_form: Literal["NFC", "NFKC", "none"] = field(
        default="NFC", metadata={"help": "Unicode normalisation form"})
    fix_whitespace: bool = field(
        default=True, metadata={"help": "unify newlines and spaces, drop control and zero-width "
                                        "characters, trailing spaces and runs of blank lines"})
    pii: bool = field(default=False, metadata={"help": "replace e-mails, IPs and phone numbers"})


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize_unicode(text: str, form: str = "NFC") -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def fix_whitespace(text: str) -> str:
    """Unify line endings and exotic spaces, drop control/zero-width characters, trailing
    spaces and more than one blank line in a row. Indentation is kept (code relies on it)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")


EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.]*\d)")
IPV6 = re.compile(r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
                  r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}"
                  r"|::1)(?![\w:])")
# A phone number: optional +country code, optional (area) code, then 2-4 groups of digits
# separated by space, dot or dash. Accepted only with 9 to 15 digits in all, so that year
# ranges ("1999-2004") and dates are left alone.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])")


def scrub_emails(text: str) -> tuple[str, int]:
    return EMAIL.subn("<EMAIL>", text)


def scrub_ips(text: str) -> tuple[str, int]:
    text, n4 = IPV4.subn("<IP>", text)
    text, n6 = IPV6.subn("<IP>", text)
    return text, n4 + n6


def scrub_phones(text: str) -> tuple[str, int]:
    count = 0

    def repl(m: re.Match) -> str:
        nonlocal count
        digits = sum(c.isdigit() for c in m.group(0))
        if 9 <= digits <= 15:
            count += 1
            return "<PHONE>"
        return m.group(0)

    return PHONE.sub(repl, text), count


# Order matters: an IP address would otherwise look like a phone number.
PII_SCRUBBERS: dict[str, Scrubber] = {"email": scrub_emails, "ip": scrub_ips, "phone": scrub_phones}


def clean_text(text: str, cfg: CleanConfig,
               scrubbers: dict[str, Scrubber] | None = None) -> tuple[str, dict[str, int]]:
    """The cleaned text and how many replacements each scrubber made."""
    text = normalize_unicode(text, cfg.unicode_form)
    if cfg.fix_whitespace:
        text = fix_whitespace(text)
    counts: dict[str, int] = {}
    if cfg.pii or scrubbers:
        for name, scrub in {**(PII_SCRUBBERS if cfg.pii else {}), **(scrubbers or {})}.items():
            text, n = scrub(text)
            if n:
                counts[name] = n
    return text, counts
