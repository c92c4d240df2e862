"""Readers for the two file formats the datasets come in, and the `Interactions` they produce.

* GroupLens ratings: one rating per line, ``user<sep>item<sep>rating<sep>timestamp``
  (``::`` in ML-1M's ratings.dat, a tab in ML-100k's u.data), in any order.
* User sequences: one user per line, ``user item item ...``, whitespace separated, items in time
  order (ml-1m/sequences.txt and the S3-Rec Amazon files).

Both readers are strict: a malformed line raises `DataError` naming the file and line, because a
silently skipped or misread line changes every metric computed downstream.
"""

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_RATING_COLUMNS = ("user", "item", "rating", "timestamp")
_INTEGER = re.compile(r"[-+]?[0-9]+")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TRUNCATED_HINT = (
    "; the last line has no newline, so the file looks truncated: copy or download it again"
)


class DataError(ValueError):
    """A data file is malformed or truncated; the message starts with ``path:lineno:``."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing lists of arrays with == is ambiguous
class Interactions:
    """Every user's items in time order, with item ids remapped to 1..num_items (0 is padding).

    Attributes:
        name: dataset name, e.g. "ml-1m".
        sequences: one int64 array per user, remapped item ids in time order.
        timestamps: int64 unix seconds aligned with `sequences`, or None when the source has none.
        num_items: size of the item vocabulary, padding excluded.
        raw_item_ids: [num_items + 1]; raw_item_ids[i] is the original id of item i, [0] = -1 (int64);
            an object array of str, [0] = None, for a log whose item ids are text.
        raw_user_ids: [num_users]; original user ids in the order of `sequences` (int64, or str).
        report: what reading kept and dropped (counts), for a log read by pipeline.data.interactions.
    """

    name: str
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    num_items: int
    raw_item_ids: np.ndarray
    raw_user_ids: np.ndarray
    report: dict | None = field(default=None)

    def __post_init__(self):
        if len(self.raw_user_ids) != len(self.sequences):
            raise ValueError(
                f"Interactions {self.name!r}: {len(self.raw_user_ids)} raw user ids for "
                f"{len(self.sequences)} sequences; there must be one id per sequence"
            )
        if self.raw_item_ids.shape != (self.num_items + 1,):
            raise ValueError(
                f"Interactions {self.name!r}: raw_item_ids has shape {self.raw_item_ids.shape}, "
                f"expected ({self.num_items + 1},) (one entry per item plus padding at 0)"
            )
        if self.timestamps is not None and len(self.timestamps) != len(self.sequences):
            raise ValueError(
                f"Interactions {self.name!r}: {len(self.timestamps)} timestamp arrays for "
                f"{len(self.sequences)} sequences; pass one per sequence, or None"
            )

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(sequence) for sequence in self.sequences)


def read_grouplens_ratings(
    path: str | Path, sep: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reads a GroupLens ratings file into (user, item, rating, timestamp) int64 columns.

    Args:
        path: the ratings file, e.g. ml-1m/ratings.dat or ml-100k/u.data.
        sep: the field separator: "::" for ratings.dat, "\\t" for u.data.

    Raises:
        DataError: the file is empty, or a line does not hold exactly 4 integer fields
            (a last line cut mid-record by an interrupted copy is reported as such).
    """
    text = _read_text(path)
    if not text.strip():
        raise DataError(
            f"{path}:1: the file is empty; expected lines like "
            f"'user{sep}item{sep}rating{sep}timestamp'"
        )
    rows = _parse_ratings_fast(text, sep)
    if rows is None:
        rows = _parse_ratings_by_line(path, text, sep)
    return tuple(np.ascontiguousarray(rows[:, k]) for k in range(4))


def read_user_sequences(path: str | Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Reads a one-user-per-line file ``user item item ...`` into raw ids.

    Returns:
        (users, sequences): int64 [num_lines] raw user ids in file order, and one int64 array of
        raw item ids per user, in the order of the file (time order by convention).

    Raises:
        DataError: the file is empty, or a line is empty, holds a non-integer token, has a user
            without items, or repeats a user of an earlier line.
    """
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}:1: the file is empty; expected lines like 'user item item ...'")
    if not text.endswith("\n"):
        logger.warning(
            "%s: the last line has no newline; if the file was cut short, copy it again", path
        )
    users, sequences, line_of_user = [], [], {}
    for lineno, line in enumerate(_split_lines(text), start=1):
        values = _line_to_int64(path, lineno, line)
        user = int(values[0])
        if len(values) < 2:
            raise DataError(
                f"{path}:{lineno}: user {user} has no items; "
                "remove the line or add the user's items"
            )
        if user in line_of_user:
            raise DataError(
                f"{path}:{lineno}: user {user} already has a line ({path}:{line_of_user[user]}); "
                "put each user's items on one line, in time order"
            )
        line_of_user[user] = lineno
        users.append(user)
        sequences.append(values[1:])
    return np.array(users, dtype=np.int64), sequences


def interactions_from_ratings(
    name: str,
    user: np.ndarray,
    item: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    min_rating: int | None = None,
) -> Interactions:
    """Groups ratings into per-user sequences in time order.

    Ratings with equal timestamps keep their file order (a stable sort), so the same file always
    gives the same sequences. Users come in ascending raw id order.

    Args:
        min_rating: keep only ratings >= min_rating as positives; None keeps every rating.
    """
    if not len(user) == len(item) == len(rating) == len(timestamp):
        raise ValueError(
            f"{name}: columns differ in length (user {len(user)}, item {len(item)}, "
            f"rating {len(rating)}, timestamp {len(timestamp)})"
        )
    if min_rating is not None and len(rating):
        keep = rating >= min_rating
        if not keep.any():
            raise DataError(
                f"{name}: no rating is >= min_rating={min_rating} (its ratings run from {rating.min()} "
                f"to {rating.max()}); lower min_rating or set it to null"
            )
        user, item, timestamp = user[keep], item[keep], timestamp[keep]
    if len(user) == 0:
        raise DataError(f"{name}: no ratings")
    by_time = np.argsort(timestamp, kind="stable")
    order = by_time[np.argsort(user[by_time], kind="stable")]
    user, item, timestamp = user[order], item[order], timestamp[order]
    starts = np.flatnonzero(np.diff(user)) + 1
    raw_item_ids, remapped = _remap_items(item)
    return Interactions(
        name=name,
        sequences=np.split(remapped, starts),
        timestamps=np.split(timestamp.astype(np.int64), starts),
        num_items=len(raw_item_ids) - 1,
        raw_item_ids=raw_item_ids,
        raw_user_ids=user[np.concatenate(([0], starts))].astype(np.int64),
    )


def interactions_from_sequences(
    name: str, users: np.ndarray, seqs: list[np.ndarray]
) -> Interactions:
    """Builds `Interactions` from per-user raw item sequences already in time order.

    The source has no timestamps, so `Interactions.timestamps` is None.
    """
    if len(users) != len(seqs):
        raise ValueError(
            f"{name}: {len(users)} users for {len(seqs)} sequences; pass one sequence per user"
        )
    if len(seqs) == 0 or any(len(seq) == 0 for seq in seqs):
        raise ValueError(
            f"{name}: every user needs at least one item, and there must be at least one user"
        )
    lengths = np.array([len(seq) for seq in seqs])
    raw_item_ids, remapped = _remap_items(np.concatenate(seqs))
    return Interactions(
        name=name,
        sequences=np.split(remapped, np.cumsum(lengths)[:-1]),
        timestamps=None,
        num_items=len(raw_item_ids) - 1,
        raw_item_ids=raw_item_ids,
        raw_user_ids=np.asarray(users, dtype=np.int64),
    )


def _remap_items(raw_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps raw item ids, sorted ascending, to 1..N; returns (raw id of each new id, new ids)."""
    unique, inverse = np.unique(raw_items, return_inverse=True)
    raw_item_ids = np.concatenate(([-1], unique)).astype(np.int64)
    return raw_item_ids, inverse.astype(np.int64) + 1


def _read_text(path: str | Path) -> str:
    # Undecodable bytes become U+FFFD, which the parsers then report as a non-integer at its line.
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


def _parse_int(token: str) -> int | None:
    token = token.strip()
    if not _INTEGER.fullmatch(token):
        return None
    value = int(token)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _line_to_int64(path: str | Path, lineno: int, line: str) -> np.ndarray:
    tokens = line.split()
    if not tokens:
        raise DataError(f"{path}:{lineno}: empty line; every line must be 'user item item ...'")
    try:
        return np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        position = next(k for k, token in enumerate(tokens) if not _is_int64(token))
        what = "the user id" if position == 0 else f"item {position}"
        raise DataError(
            f"{path}:{lineno}: {what} is {tokens[position]!r}, not an integer"
        ) from None


def _is_int64(token: str) -> bool:
    try:
        np.int64(token)
    except (ValueError, OverflowError):
        return False
    return True


# Byte classes for the fast ratings parser; 0 marks every byte that a well-formed file never has.
_DIGIT, _MINUS, _SEP, _NEWLINE = 1, 2, 3, 4
_BYTE_CLASS = np.zeros(256, dtype=np.uint8)
_BYTE_CLASS[ord("0") : ord("9") + 1] = _DIGIT
_BYTE_CLASS[ord("-")] = _MINUS
_BYTE_CLASS[ord("\t")] = _SEP
_BYTE_CLASS[ord("\n")] = _NEWLINE
_MAX_FIELD_BYTES = 18  # sign included: any such integer fits in int64


def _parse_ratings_fast(text: str, sep: str) -> np.ndarray | None:
    """Parses well-formed ratings at C speed; None if anything is unusual.

    np.fromstring reads 1M lines in a fraction of a second but silently reads "-" as 0, saturates
    on overflow and treats any whitespace as a separator, so it is only trusted after a vectorized
    check that every line is exactly four non-empty fields of an optional minus and digits, 18
    bytes at most. Anything else goes to `_parse_ratings_by_line`, which either parses it or says
    where it is wrong.
    """
    if sep != "\t" and "\t" in text:  # a tab would pass for a separator below
        return None
    body = text.replace(sep, "\t")
    if not body.endswith("\n"):
        body += "\n"
    kind = _BYTE_CLASS[np.frombuffer(body.encode("utf-8"), dtype=np.uint8)]
    if not kind.all():
        return None
    is_sep = kind >= _SEP
    after_sep = np.concatenate(([True], is_sep[:-1]))
    before_sep = np.concatenate((is_sep[1:], [True]))
    if (is_sep & after_sep).any():  # an empty field or an empty line
        return None
    field_start = np.flatnonzero(~is_sep & after_sep)
    field_end = np.flatnonzero(~is_sep & before_sep)
    if (field_end - field_start >= _MAX_FIELD_BYTES).any():
        return None
    minus = np.flatnonzero(kind == _MINUS)
    if not (after_sep[minus] & (kind[minus + 1] == _DIGIT)).all():
        return None
    fields_per_line = np.diff(
        np.searchsorted(field_start, np.flatnonzero(kind == _NEWLINE)), prepend=0
    )
    if (fields_per_line != 4).any():
        return None
    values = np.fromstring(body, dtype=np.int64, sep=" ")
    return values.reshape(-1, 4) if values.size == 4 * len(fields_per_line) else None


def _parse_ratings_by_line(path: str | Path, text: str, sep: str) -> np.ndarray:
    lines = _split_lines(text)
    rows = np.empty((len(lines), 4), dtype=np.int64)
    for index, line in enumerate(lines):
        lineno = index + 1
        truncated = lineno == len(lines) and not text.endswith("\n")
        hint = _TRUNCATED_HINT if truncated else ""
        if not line.strip():
            raise DataError(f"{path}:{lineno}: empty line; remove it")
        fields = line.split(sep)
        if len(fields) != 4:
            raise DataError(
                f"{path}:{lineno}: expected 4 fields (user, item, rating, timestamp) separated by "
                f"{sep!r}, found {len(fields)}: {line[:80]!r}{hint}"
            )
        for column, field in enumerate(fields):
            value = _parse_int(field)
            if value is None:
                raise DataError(
                    f"{path}:{lineno}: {_RATING_COLUMNS[column]} is {field!r}, not an integer{hint}"
                )
            rows[index, column] = value
    return rows
