"""Translated manual pages as prose documents: the multilingual part of the quality corpus (issue 11).

Debian's ``manpages-de`` / ``manpages-fr`` / ``manpages-es`` / ``manpages-it`` … packages carry real,
human-translated text (the manpages-l10n project) in languages that Gemma-3 was trained on and SmolLM2
mostly was not. A corpus source ``manpages:de`` reads ``/usr/share/man/de/man*/*.gz`` in sorted path order
(one document per page) and strips the troff markup down to its prose: headings and paragraphs, with the
words that fonts and macros wrapped kept and the requests, comments and escapes dropped.

Document indices (and so sample ids and the held-out split) are stable for one installed package version
(Debian bookworm: 4.18.1-1); another version has other pages.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
PREFIX = "manpages:"

# Font and size macros whose arguments are text: the alternating ones (BR, IR, …) join their arguments
# without spaces, the others with spaces.
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_TEXT_MACROS = {"B", "I", "SM", "SB", "SH", "SS", "UR", "MT"}
_BREAKS = {"PP", "P", "LP", "TP", "IP", "HP", "RS", "RE", "br", "sp", "nf", "fi", "EX", "EE", "TQ", "in", "ti"}
# Named glyphs (\(xx, \[xx]) worth keeping; the rest are dropped.
_GLYPHS = {
    "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "em": "—", "en": "–", "hy": "-",
    "mi": "-", "bu": "•", "co": "©", "rg": "®", "tm": "™", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›",
    "ga": "`", "ha": "^", "ti": "~", "rs": "\\", "sl": "/", "at": "@", "sh": "#", "Do": "$", "dg": "†",
    "de": "°", "mu": "×", "<=": "≤", ">=": "≥", "->": "→", "<-": "←", "lh": "☜", "rh": "☞", "ss": "ß",
    ':a': "ä", ':o': "ö", ':u': "ü", ':A': "Ä", ':O': "Ö", ':U': "Ü", "'e": "é", "`e": "è", "^e": "ê",
}
_ESCAPE = re.compile(
    r"""\\(?:
        f(?:\[[^\]]*\]|\(..|.)       # font change: \fB \f(CW \f[I]
      | s[+-]?(?:\d|\(\d\d|\[\d+\])  # size change: \s-1 \s0
      | \((?P<glyph2>..)             # \(em
      | \[(?P<glyphn>[^\]]*)\]       # \[em]
      | \*(?:\[[^\]]*\]|\(..|.)      # string interpolation: \*(lq \*R
      | [nmg](?:\[[^\]]*\]|\(..|.)   # registers, colours
      | [kz].                        # marks, zero-width
      | [hvwlLoDbxXNZRSA](?:'[^']*')?  # motions, widths, drawing: drop with their argument
      | (?P<char>.)                  # any other one-character escape
    )""",
    re.VERBOSE,
)
_SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`", ".": "."}


class ManpagesMissing(FileNotFoundError):
    """The manual pages of a language are not installed; the message gives the install command."""


def language_of(source: str) -> str | None:
    """``'manpages:de'`` → ``'de'``; ``None`` for any other source."""
    return source[len(PREFIX):] if source.startswith(PREFIX) else None


def page_files(language: str, root: Path | None = None) -> list[Path]:
    """The installed manual pages of ``language`` under ``root`` (default :data:`MAN_ROOT`), sorted by path
    (the document order)."""
    folder = (root or MAN_ROOT) / language
    files = sorted(p for p in folder.glob("man*/*") if p.is_file() and not p.is_symlink()) if folder.is_dir() else []
    if not files:
        raise ManpagesMissing(
            f"corpus source 'manpages:{language}': no manual pages under {folder}. Install them with "
            f"`apt-get update && apt-get install -y --no-install-recommends manpages-{language}` (Debian/Ubuntu; "
            "slim Docker images exclude /usr/share/man with a path-exclude in /etc/dpkg/dpkg.cfg.d/: drop it first)"
        )
    return files


def read_page(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return troff_to_prose(raw.decode("utf-8", errors="replace"))


def iter_pages(language: str, root: Path | None = None) -> Iterator[tuple[str, str]]:
    """(origin, prose) of every page of ``language``; pages that strip to nothing are skipped (``.so``
    links)."""
    for path in page_files(language, root):
        text = read_page(path)
        if text.strip():
            yield str(path), text


def _unescape(line: str) -> str:
    def sub(m: re.Match) -> str:
        glyph = m.group("glyph2") or m.group("glyphn")
        if glyph is not None:
            return _GLYPHS.get(glyph, "")
        char = m.group("char")
        return _SINGLE.get(char, "") if char is not None else ""

    return _ESCAPE.sub(sub, line)


def _macro_args(rest: str) -> list[str]:
    """Split a macro's arguments: blanks separate them, double quotes group them."""
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def troff_to_prose(source: str) -> str:
    """The prose of a man(7) page: paragraphs separated by blank lines, a heading as a paragraph of its own.

    Not a troff implementation: enough of man(7) for translated pages to read as text (groff is not
    needed). Tables (``.TS``/``.TE``) keep their cells as lines; unknown requests are dropped.
    """
    paragraphs: list[list[str]] = [[]]

    def brk() -> None:
        if paragraphs[-1]:
            paragraphs.append([])

    in_table = False
    skip_until: str | None = None  # the end of a macro definition (.de … ..) or an ignored block (.ig)
    for line in source.splitlines():
        if skip_until is not None:
            if line.strip() == skip_until:
                skip_until = None
            continue
        if re.match(r"[.'](de|de1|am|ig)\b", line):
            parts = line.split()
            skip_until = "." + parts[2] if line[1:3] != "ig" and len(parts) > 2 else ".."
            continue
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")) or line.startswith(".\\#"):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name in ("TS", "TE"):
                in_table = name == "TS"
                brk()
            elif name in ("SH", "SS"):
                brk()
                paragraphs[-1].append(_unescape(" ".join(_macro_args(rest))))
                brk()
            elif name in _ALTERNATING:
                paragraphs[-1].append(_unescape("".join(_macro_args(rest))))
            elif name in _TEXT_MACROS:
                paragraphs[-1].append(_unescape(" ".join(_macro_args(rest))))
            elif name in ("IP", "TP", "HP"):
                brk()
                args = _macro_args(rest)
                if name == "IP" and args and args[0] not in ("\\(bu", "\\[bu]", "*", "-"):
                    paragraphs[-1].append(_unescape(args[0]))
            elif name in _BREAKS:
                brk()
            continue
        if in_table and (line.rstrip().endswith(".") and not line.strip(" lrcnsLRCNS|.")):
            continue  # a table's format line ("l l.")
        text = _unescape(line.replace("\t", " ")).strip()
        if text:
            paragraphs[-1].append(text)
        else:
            brk()
    prose = "\n\n".join(re.sub(r"[ ]{2,}", " ", " ".join(p)).strip() for p in paragraphs if p)
    return prose + "\n" if prose else ""
