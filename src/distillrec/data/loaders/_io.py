"""File and row helpers every loader shares: one way to read a text file's rows, find files, parse ids.

- :func:`iter_lines` / :class:`TextRows`: stream a text file (gzip when the name ends in ``.gz``) line by line with
  1-based line numbers; lines are split at ``\\n`` (a trailing ``\\r`` is dropped, a UTF-8 byte-order mark on line 1
  too); blank lines are skipped and counted in the load report; bytes that are not UTF-8 raise a
  :class:`DataError` naming the file and line; a file with no data line raises one too.
- :func:`as_folder`, :func:`find_one`, :func:`require_file`: locate a loader's files, with the fix in the error.
- :func:`parse_int`, :func:`parse_ints`: integer ids, with file and line in the error.
- :func:`header_columns`: column positions from a header line; :meth:`TextRows.check_width`: a row with more fields
  than the header names is a DataError naming the file, the line and the expected columns (an extra field would
  otherwise shift silently into another column's place).
- :func:`dense_id_limit` / :func:`check_dense_ids`: formats whose item ids are used as dense indices (S3-Rec numbers,
  RecBole atomic indices) accept an id only up to a bound set by the number of distinct ids, so one stray huge id
  cannot make a loader allocate gigabytes.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..dataset import DataError, LoadReport

# ids must fit the int64 arrays every dataset holds
MAX_INT_ID = 2**63 - 1
# dense numbering: an id is accepted as a dense index up to DENSE_ID_FACTOR * (distinct ids) + DENSE_ID_SLACK
DENSE_ID_FACTOR = 10
DENSE_ID_SLACK = 100_000


# --------------------------------------------------------------------------------------------------------------------
# files


def as_folder(path: Path | str | None, fmt: str) -> Path:
    """The folder a loader reads: ``path`` itself, or the folder of a file inside it."""
    if path is None:
        raise DataError(f"format '{fmt}' needs a path: give dataset.path (the folder that holds the files)")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: does not exist; give the folder that holds the {fmt} files")
    return p if p.is_dir() else p.parent


def find_one(folder: Path, pattern: str, what: str, option: str, *, exclude: tuple[str, ...] = ()) -> Path:
    """The single file in ``folder`` matching ``pattern`` (a glob), or a DataError saying what to do."""
    found = sorted(p for p in folder.glob(pattern) if p.is_file() and not any(p.name.endswith(e) for e in exclude))
    if not found:
        raise DataError(f"{folder}: no {what} file ({pattern}) found; put it there or give the option '{option}'")
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:6])
        raise DataError(f"{folder}: several {what} files match {pattern} ({names}); choose one with the option '{option}'")
    return found[0]


def require_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found; {fix}")
    return path


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# rows


def iter_lines(path: Path | str, *, report: LoadReport | None = None, skip_blank: bool = True,
               errors: str = "strict", expect: str = "data rows") -> Iterator[tuple[int, str]]:
    """Yield ``(line number from 1, line without its end)`` for each line of a text file.

    Blank lines are skipped (``skip_blank``) and counted in ``report`` when one is given. Bytes that are not UTF-8
    raise a DataError naming the line (``errors="replace"`` replaces them instead). A missing, unreadable or
    truncated file, or one without any non-blank line, raises a DataError (``expect`` says what the file should hold).
    """
    path = Path(path)
    n_data = n_blank = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8", errors)
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}, line {lineno}: not valid UTF-8 text ({e.reason}); re-save the file as UTF-8"
                    ) from None
                if line.endswith("\n"):
                    line = line[:-1]
                if line.endswith("\r"):
                    line = line[:-1]
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if not line.strip():
                    n_blank += 1
                    if skip_blank:
                        continue
                else:
                    n_data += 1
                yield lineno, line
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read ({e}); check that the file is complete (and gzip when named .gz)") from None
    if n_data == 0:
        raise DataError(f"{path}: the file is empty; give a file with {expect}")
    if report is not None and n_blank:
        report.skip(f"blank lines in {path.name} (ignored)", n_blank)


def read_lines(path: Path | str, **kwargs) -> list[str]:
    """All non-blank lines of a text file (see :func:`iter_lines`), for formats that need the whole file."""
    return [line for _, line in iter_lines(path, **kwargs)]


class TextRows:
    """The rows of a delimited text file: iterate ``(line number from 1, fields)``.

    ``sep`` is the field separator (``None``: runs of whitespace); ``maxsplit`` as in :meth:`str.split`. With
    ``header=True`` the first non-blank line is read at once into :attr:`header_line` / :attr:`header_lineno`
    (use :meth:`columns`) and the rows start after it. Blank lines are skipped and counted (see :func:`iter_lines`).
    """

    def __init__(self, path: Path | str, sep: str | None = "\t", *, header: bool = False, maxsplit: int = -1,
                 report: LoadReport | None = None, errors: str = "strict", expect: str = "data rows") -> None:
        self.path = Path(path)
        self.sep = sep
        self.maxsplit = maxsplit
        self._lines = iter_lines(self.path, report=report, errors=errors, expect=expect)
        self.header_line: str | None = None
        self.header_lineno = 0
        if header:
            self.header_lineno, self.header_line = next(self._lines)

    def columns(self, required: list[str], *, strip_types: bool = True) -> dict[str, int]:
        """Column name -> position from the header (see :func:`header_columns`)."""
        if self.header_line is None:
            raise ValueError("TextRows.columns needs header=True")
        return header_columns(self.header_line, self.path, self.sep or "\t", required, strip_types=strip_types,
                              lineno=self.header_lineno)

    def header_names(self, *, strip_types: bool = True) -> list[str]:
        if self.header_line is None:
            raise ValueError("TextRows.header_names needs header=True")
        names = [c.strip() for c in self.header_line.split(self.sep or "\t")]
        return [c.split(":", 1)[0] for c in names] if strip_types else names

    def check_width(self, lineno: int, parts: list[str], fix: str) -> None:
        """A DataError naming the file, line and the header's columns when the row has more fields than the header
        names (``fix`` says what a row must hold)."""
        names = self.header_names(strip_types=False)
        if len(parts) > len(names):
            sep = "tab" if self.sep == "\t" else repr(self.sep)
            raise DataError(
                f"{self.path}, line {lineno}: {len(parts)} {sep}-separated fields, but the header (line "
                f"{self.header_lineno}) names {len(names)} columns ({', '.join(names)}); {fix}"
            )

    def unused_columns(self, used: list[str]) -> list[str]:
        """The header's columns not in ``used`` (for the load report)."""
        return [n for n in self.header_names() if n and n not in used]

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        sep, maxsplit = self.sep, self.maxsplit
        for lineno, line in self._lines:
            yield lineno, line.split(sep, maxsplit)


def header_columns(line: str, path: Path, sep: str, required: list[str], *, strip_types: bool = True,
                   lineno: int = 1) -> dict[str, int]:
    """Column name (``name:type`` reduced to ``name``) -> position; DataError naming missing columns."""
    names = [c.strip() for c in line.split(sep)]
    if strip_types:
        names = [c.split(":", 1)[0] for c in names]
    cols = {n: i for i, n in enumerate(names)}
    missing = [r for r in required if r not in cols]
    if missing:
        raise DataError(
            f"{path}, line {lineno}: header {names} lacks column(s) {missing}; the first line must name the columns "
            f"{required} separated by {sep!r}"
        )
    return cols


# --------------------------------------------------------------------------------------------------------------------
# ids


def _too_large(value: int, path: Path, lineno: int, field: str) -> DataError:
    return DataError(
        f"{path}, line {lineno}: {field} {value} is too large for an id (the largest is {MAX_INT_ID}); "
        "give the item's number, not a hash or a code"
    )


def parse_int(tok: str, path: Path, lineno: int, field: str) -> int:
    try:
        value = int(tok)
    except ValueError:
        raise DataError(
            f"{path}, line {lineno}: {field} '{tok[:40]}' is not an integer; ids in this file must be integers"
        ) from None
    if not -MAX_INT_ID <= value <= MAX_INT_ID:
        raise _too_large(value, path, lineno, field)
    return value


def _is_int(tok: str) -> bool:
    try:
        int(tok)
    except ValueError:
        return False
    return True


def parse_ints(tokens: str | list[str], path: Path, lineno: int, field: str) -> list[int]:
    """Integer ids from a whitespace-separated string or a list of tokens."""
    toks = tokens.split() if isinstance(tokens, str) else tokens
    try:
        values = [int(t) for t in toks]
    except ValueError:
        bad = next(t for t in toks if not _is_int(t))
        raise DataError(
            f"{path}, line {lineno}: {field} contains '{bad[:40]}', which is not an integer id; "
            "give space-separated integer ids"
        ) from None
    if values and (max(values) > MAX_INT_ID or min(values) < -MAX_INT_ID):
        raise _too_large(next(v for v in values if abs(v) > MAX_INT_ID), path, lineno, field)
    return values


def dense_id_limit(n_distinct: int) -> int:
    """The largest id kept as a dense index when the data holds ``n_distinct`` distinct ids."""
    return DENSE_ID_FACTOR * n_distinct + DENSE_ID_SLACK


def check_dense_ids(top: int, n_distinct: int, path: Path, lineno: int, what: str, fix: str) -> None:
    """DataError naming the line of ``top`` when it is beyond :func:`dense_id_limit` of ``n_distinct``."""
    limit = dense_id_limit(n_distinct)
    if top > limit:
        raise DataError(
            f"{path}, line {lineno}: {what} {top} is far beyond the {n_distinct} distinct ids of the data; these ids "
            f"are used as dense indices, so at most {DENSE_ID_FACTOR} x {n_distinct} + {DENSE_ID_SLACK} = {limit} "
            f"is accepted; {fix}"
        )
