"""The King James text, offline: the `bible` program of the Debian package `bible-kjv`, read verse by verse and split
into training and held-out books.

The split is by book, so no held-out verse has a neighbour in training: book number b (1-based, in canonical order,
Genesis = 1, Revelation = 66) is held out when b is a multiple of `heldout_every`. The default 10 holds out 2 Samuel,
Proverbs, Amos, Matthew, Philippians and 1 Peter (3,036 of 31,102 verses: narrative, wisdom, prophecy, gospel and
epistles alike).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

KJV_COMMAND = ("bible", "-f", "Gen1:1-Rev22:21")
"""The whole text, one verse a line: `Ge1:1 In the beginning God created the heaven and the earth.`"""
INSTALL_HINT = "apt-get install -y bible-kjv"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


@dataclass(frozen=True)
class Book:
    """One book: its abbreviation as `bible` prints it (Ge, Exo, ..., Rev) and its verses' text."""

    name: str
    verses: tuple[str, ...]

    def text(self) -> str:
        """The book as one document: its verses, one a line (references dropped)."""
        return "".join(f"{v}\n" for v in self.verses)


def run_bible() -> str:
    """The output of `bible -f 'Gen1:1-Rev22:21'`; a missing program is a one-line error naming the package."""
    if shutil.which(KJV_COMMAND[0]) is None:
        raise FileNotFoundError(
            f"the King James text needs the `bible` program (Debian package bible-kjv), which is not installed; "
            f"install it with `{INSTALL_HINT}`"
        )
    done = subprocess.run(KJV_COMMAND, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"`{' '.join(KJV_COMMAND)}` failed (exit {done.returncode}: {done.stderr.strip()[:200]}); "
            f"reinstall it with `{INSTALL_HINT}`"
        )
    return done.stdout


def parse_books(text: str) -> list[Book]:
    """Books in the order the text gives them, from lines `<book><chapter>:<verse> <text>`."""
    books: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None:
            raise ValueError(
                f"line {number} of the King James text is not `<book><chapter>:<verse> <text>`: {line[:80]!r}; "
                f"reinstall the package with `{INSTALL_HINT}`"
            )
        books.setdefault(match.group(1), []).append(match.group(4).strip())
    return [Book(name, tuple(verses)) for name, verses in books.items()]


def read_kjv() -> list[Book]:
    """The 66 books of the King James text."""
    return parse_books(run_bible())


def split_books(books: list[Book], heldout_every: int) -> tuple[list[Book], list[Book]]:
    """(training books, held-out books): book b (1-based) is held out when b % heldout_every == 0."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be 2 or more (1 would hold out every book), got {heldout_every}")
    if len(books) < heldout_every:
        raise ValueError(
            f"the text has {len(books)} books, fewer than heldout_every={heldout_every}: no book would be held out"
        )
    train = [b for i, b in enumerate(books, start=1) if i % heldout_every]
    heldout = [b for i, b in enumerate(books, start=1) if not i % heldout_every]
    return train, heldout
