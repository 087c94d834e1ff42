"""``classnames.txt``: which class name the prompts use for each class folder.

One line per class folder, in one of three forms (blank lines are ignored)::

    ADI adipose tissue                      folder, a space, the class name (a folder name without spaces)
    normal tissue<TAB>normal colon mucosa   folder, a tab, the class name (any folder name; the first tab splits)
    "normal tissue" normal colon mucosa     the folder in double quotes, then the class name

The file must be UTF-8; a byte-order mark (as Windows editors write it) is fine.
Two folders may not share a class name, compared ignoring case and repeated
spaces as the text encoders' tokenisers do: their prompts would be identical,
so no model could tell the two classes apart.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Optional

from calbench.errors import CalbenchError

FORMS = "'<class_folder> <class name>' (a folder with spaces: '\"<class folder>\" <class name>' or a tab between them)"


def read_text(path: Path) -> str:
    """The file as text, UTF-8 with or without a byte-order mark; a one-line error naming the encoding otherwise."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\0" in data:
        raise CalbenchError(f"{path} is UTF-16 text; classnames.txt must be UTF-8: save it as UTF-8 and run again")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CalbenchError(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} is not UTF-8 (a Latin-1 or Windows-1252 file?); "
            "classnames.txt must be UTF-8: save it as UTF-8 and run again"
        ) from None


def _quoted(text: str) -> Optional[tuple[str, str]]:
    """(folder, name) of a line in the quoted form, or None."""
    end = text.find('"', 1)
    if end < 2 or text[end + 1 : end + 2] not in (" ", "\t"):
        return None
    return text[1:end], text[end + 1 :].strip()


def parse_line(text: str) -> Optional[tuple[str, str]]:
    """(class folder, class name) of one stripped line in any accepted form, or None when it is in none.

    A line that starts with a quote is in the quoted form, unless it is not one and has a tab
    (then it is tab-separated: a folder whose name starts with a quote).
    """
    if text.startswith('"') and (_quoted(text) is not None or "\t" not in text):
        folder, name = _quoted(text) or ("", "")
    elif "\t" in text:
        folder, name = (part.strip() for part in text.split("\t", 1))
    else:
        parts = text.split(maxsplit=1)
        if len(parts) != 2:
            return None
        folder, name = parts
    return (folder, name) if folder and name else None


def format_line(folder: str, name: str) -> str:
    """The line for ``folder`` (tab-separated when the folder name has spaces or starts with a quote)."""
    plain = folder == "".join(folder.split()) and not folder.startswith('"')
    return f"{folder} {name}\n" if plain else f"{folder}\t{name}\n"


def read_classnames(path: Path) -> dict[str, tuple[int, str]]:
    """classnames.txt as {class_folder: (line number, class name)}, every line and name checked."""
    names: dict[str, tuple[int, str]] = {}
    seen: dict[str, tuple[str, int]] = {}  # normalised class name -> (folder, line number)
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parsed = parse_line(line.strip())
        if parsed is None:
            raise CalbenchError(f"{path}:{number}: expected {FORMS}, got {line.strip()!r}")
        folder, name = parsed
        if folder in names:
            raise CalbenchError(
                f"{path}:{number}: class folder {folder!r} is already named on line {names[folder][0]}; keep one line per folder"
            )
        key = " ".join(name.split()).casefold()
        if key in seen:
            other, line_number = seen[key]
            raise CalbenchError(
                f"{path}: class folders {other!r} (line {line_number}) and {folder!r} (line {number}) are both named "
                f"{name!r}; give each folder its own class name, or merge the two folders"
            )
        names[folder] = (number, name)
        seen[key] = (folder, number)
    return names
