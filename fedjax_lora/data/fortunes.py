"""Loader for Debian's fortune-cookie files: topic- and language-labelled short texts offline.

Format: a plain-text file per topic, entries separated by lines holding a single `%`. English
files lie directly under `/usr/share/games/fortunes/`; other languages in subfolders (`de/`,
`es/`, `it/`, ...). Index files (`.dat`), `.u8` links, offensive files (name ending `-o`, or under
an `off/` folder) and symlinks are skipped. Install with `apt-get install fortunes fortunes-de ...`
(or `apt-get download` + `dpkg -x` and point `root` at the extracted folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedjax_lora.errors import DataError

FORTUNES_ROOT = Path("/usr/share/games/fortunes")
ENGLISH = "en"
_SKIP_SUFFIXES = (".dat", ".u8", ".pos")
_TOPIC_SUFFIX = ".fortunes"  # some languages (es) name their files `<topic>.fortunes`


def _is_topic_file(path: Path) -> bool:
    name = path.name
    return (
        path.is_file()
        and not path.is_symlink()
        and not name.startswith(".")
        and not name.endswith(_SKIP_SUFFIXES)
        and not name.endswith("-o")
    )


def _topic_name(path: Path) -> str:
    name = path.name
    return name[: -len(_TOPIC_SUFFIX)] if name.endswith(_TOPIC_SUFFIX) else name


def _language_dir(language: str, root: Path) -> Path:
    folder = root if language == ENGLISH else root / language
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no fortunes for language {language!r} at {folder}; install Debian's fortunes "
            f"packages (e.g. fortunes, fortunes-{language}) or pass root="
        )
    return folder


def _topic_files(language: str, root: Path) -> dict[str, Path]:
    folder = _language_dir(language, Path(root))
    return {_topic_name(p): p for p in sorted(folder.iterdir()) if _is_topic_file(p)}


def list_languages(root: str | Path = FORTUNES_ROOT) -> list[str]:
    """Languages present: `"en"` if the root holds topic files, plus every subfolder with some."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no fortunes folder at {root}; install Debian's fortunes")
    langs = [ENGLISH] if any(_is_topic_file(p) for p in root.iterdir()) else []
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and sub.name != "off" and any(_is_topic_file(p) for p in sub.iterdir()):
            langs.append(sub.name)
    return langs


def list_topics(language: str = ENGLISH, root: str | Path = FORTUNES_ROOT) -> list[str]:
    """Topic names (file names, `.fortunes` suffix dropped) of one language, sorted."""
    return list(_topic_files(language, Path(root)))


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file's text into entries (separator: a line holding only `%`)."""
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]


def read_text(path: Path, encodings: Sequence[str] = ("utf-8",)) -> str:
    """The text of `path` in the first of `encodings` that decodes all of it, strictly (no
    replacement characters, no NUL characters: a UTF-16 file is not read as UTF-8). Raises
    `DataError` naming the file, the byte offset and the fix."""
    data = path.read_bytes()
    for encoding in encodings:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as e:
            error = f"is not valid {encoding} at byte {e.start} ({e.reason})"
            continue
        if "\x00" in text:
            error = f"holds NUL characters as {encoding} (at byte {data.index(0)}; UTF-16?)"
            continue
        return text
    raise DataError(
        f"{path} {error}; convert it to UTF-8 or name its encoding with data.encodings "
        "(e.g. [utf-8, latin-1])"
    )


def load_topic(
    topic: str,
    language: str = ENGLISH,
    root: str | Path = FORTUNES_ROOT,
    encodings: Sequence[str] = ("utf-8",),
) -> list[str]:
    """The entries of one topic file (`read_text` with `encodings`)."""
    files = _topic_files(language, Path(root))
    if topic not in files:
        raise KeyError(f"no fortune topic {topic!r} for language {language!r}; have {list(files)}")
    return parse_fortunes(read_text(files[topic], encodings))


def load_topics(
    topics: list[str] | None = None,
    language: str = ENGLISH,
    root: str | Path = FORTUNES_ROOT,
    encodings: Sequence[str] = ("utf-8",),
) -> dict[str, list[str]]:
    """Entries per topic (all topics of the language by default)."""
    names = list_topics(language, root) if topics is None else topics
    return {t: load_topic(t, language, root, encodings) for t in names}


def load_language(
    language: str = ENGLISH, root: str | Path = FORTUNES_ROOT, encodings: Sequence[str] = ("utf-8",)
) -> list[str]:
    """All entries of one language, topics in sorted order."""
    return [e for entries in load_topics(None, language, root, encodings).values() for e in entries]
