"""A user's own interaction log (CSV, TSV or Parquet) -> `Interactions`, through pyarrow.

    interactions = read_interactions(TableSpec(path="log.csv"), name="interactions")

The steps, in order, each counted in `Interactions.report`:

1. read the user, item and (optional) timestamp columns with pyarrow's multithreaded CSV reader or, for
   Parquet, one row group at a time; a bad row (wrong number of fields, an empty id, an id that is not
   UTF-8 text, a timestamp that is neither integer epoch seconds nor ISO-8601) is a `DataError` naming the
   file and its 1-based line (CSV/TSV) or row group, or, with on_bad_rows=skip, dropped and counted;
2. map raw ids of any type (integers, strings) to codes over the sorted distinct raw ids;
3. drop exact duplicate rows (same user, item and timestamp) when asked, keeping the first;
4. filter to a k-core: users with >= min_user_interactions rows and items with >= min_item_interactions
   rows, repeated until nothing changes;
5. drop users left with fewer than 3 actions (leave-one-out needs train, valid and test);
6. order each user's actions by timestamp, ties in file order (a stable sort), and renumber the items
   still present 1..N (ascending raw id); users come in ascending raw id order.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.readers import DataError, Interactions

logger = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "parquet")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
ON_BAD_ROWS = ("error", "skip")
MIN_ACTIONS = 3  # leave-one-out: train, valid, test
_INTEGER = re.compile(r"\s*[-+]?[0-9]+\s*")
_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(frozen=True)
class TableSpec:
    """Where an interaction log is and how to read it.

    Attributes:
        path: the file; its extension (.csv, .tsv/.tab, .parquet/.pq, optionally + .gz etc.) gives
            the format unless `format` is set.
        user, item: the names of the id columns; timestamp: the time column, or None for a log
            without one (its rows are then in time order already: file order is kept).
        header: the first line of a CSV/TSV names the columns; when False, `column_names` does.
        delimiter: the field separator of a CSV/TSV (default "," and tab).
        on_bad_rows: "error" (a DataError at the first bad row) or "skip" (dropped and counted).
        rating: a numeric column to filter on (read_interactions' min_rating), or None.
    """

    path: str
    format: str | None = None
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"
    header: bool = True
    column_names: tuple[str, ...] | None = None
    delimiter: str | None = None
    on_bad_rows: str = "error"
    rating: str | None = None


@dataclass
class _Log:
    """The rows read, before any filter: codes into the sorted vocabularies, file order."""

    user: np.ndarray  # int64 codes into user_vocab
    item: np.ndarray
    timestamp: np.ndarray | None  # int64 unix seconds
    rating: np.ndarray | None  # float64, when spec.rating names a column
    user_vocab: np.ndarray  # sorted distinct raw ids (int64, or object array of str)
    item_vocab: np.ndarray
    bad_rows: int


def file_format(spec: TableSpec) -> str:
    """csv | tsv | parquet, from spec.format or the file's extension."""
    if spec.format:
        if spec.format not in FORMATS:
            raise DataError(f"{spec.path}: unknown data.format {spec.format!r}; valid: {', '.join(FORMATS)}")
        return spec.format
    suffixes = [s.lower() for s in Path(spec.path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    found = _EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if found is None:
        raise DataError(f"{spec.path}: cannot tell the format from the extension "
                        f"{''.join(Path(spec.path).suffixes) or '(none)'}; name the file .csv, .tsv or .parquet, "
                        f"or set data.format to one of {', '.join(FORMATS)}")
    return found


def read_interactions(spec: TableSpec, name: str, *, drop_duplicates: bool = False,
                      min_user_interactions: int = 1, min_item_interactions: int = 1,
                      min_rating: float | None = None, min_actions: int = MIN_ACTIONS) -> Interactions:
    """Reads, filters and orders an interaction log (the module's docstring lists the steps).

    Args:
        min_rating: keep only rows whose spec.rating column is >= min_rating (before the other filters).
        min_actions: users with fewer actions after the filters are dropped and counted (1 keeps everyone:
            the public datasets' presets leave that to leave_one_out, as they always did).
    """
    if spec.on_bad_rows not in ON_BAD_ROWS:
        raise DataError(f"unknown data.on_bad_rows {spec.on_bad_rows!r}; valid: {', '.join(ON_BAD_ROWS)}")
    for key, value in (("min_user_interactions", min_user_interactions),
                       ("min_item_interactions", min_item_interactions)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"data.{key} must be an integer >= 1, got {value!r}")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file; set data.path to your interaction log (CSV, TSV or Parquet)")
    if not path.is_file():
        raise DataError(f"{path}: not a file; set data.path to your interaction log (CSV, TSV or Parquet)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    fmt = file_format(spec)
    log = _read_parquet(path, spec) if fmt == "parquet" else _read_csv(path, spec, fmt)
    if min_rating is not None:
        if log.rating is None:
            raise DataError(f"{path}: min_rating={min_rating} needs a rating column")
        keep = log.rating >= min_rating
        if not keep.any():
            raise DataError(f"{name}: no rating is >= min_rating={min_rating} (its ratings run from "
                            f"{log.rating.min():g} to {log.rating.max():g}); lower min_rating or set it to null")
        log.user, log.item = log.user[keep], log.item[keep]
        log.timestamp = None if log.timestamp is None else log.timestamp[keep]
    return _build(name, log, drop_duplicates, int(min_user_interactions), int(min_item_interactions),
                  int(min_actions))


# ---------------------------------------------------------------- reading


class _Rows:
    """Where a row index of the table is in the file, for messages."""

    def __init__(self, path: Path, kind: str, first_line: int = 1, group_starts: np.ndarray | None = None):
        self.path, self.kind, self.first_line, self.group_starts = path, kind, first_line, group_starts

    def where(self, index: int) -> str:
        if self.kind == "parquet":
            group = int(np.searchsorted(self.group_starts, index, side="right") - 1)
            return f"{self.path}: row group {group}, row {index - int(self.group_starts[group])}"
        return f"{self.path}:{index + self.first_line}"


def _columns(spec: TableSpec) -> dict[str, str]:
    roles = {"user": spec.user, "item": spec.item}
    if spec.timestamp:
        roles["timestamp"] = spec.timestamp
    if spec.rating:
        roles["rating"] = spec.rating
    return roles


def _check_columns(path: Path, present: list[str], spec: TableSpec) -> None:
    for role, column in _columns(spec).items():
        if column not in present:
            raise DataError(f"{path}: no column {column!r} (data.columns.{role}); "
                            f"the columns are: {', '.join(map(repr, present))}")


def _read_csv(path: Path, spec: TableSpec, fmt: str) -> _Log:
    from pyarrow import csv

    delimiter = spec.delimiter or ("\t" if fmt == "tsv" else ",")
    parse = dict(delimiter=delimiter, ignore_empty_lines=False, quote_char=False if fmt == "tsv" else '"')
    if spec.header:
        names = _header(path, csv, parse)
        first_line = 2
    else:
        if not spec.column_names:
            raise DataError(f"{path}: data.header is false, so data.column_names must name the columns")
        names = list(spec.column_names)
        first_line = 1
    _check_columns(path, names, spec)
    wanted = list(dict.fromkeys(_columns(spec).values()))
    invalid: list = []
    error_mode = spec.on_bad_rows == "error"

    def on_invalid(row):
        invalid.append(row)
        return "error" if error_mode else "skip"

    def read(threads: bool, types: dict | None = None) -> pa.Table:
        return csv.read_csv(
            path,
            read_options=csv.ReadOptions(use_threads=threads, column_names=None if spec.header else names,
                                         block_size=1 << 24),
            parse_options=csv.ParseOptions(**parse, invalid_row_handler=on_invalid),
            convert_options=csv.ConvertOptions(include_columns=wanted, strings_can_be_null=True,
                                               column_types=types or {}))

    try:
        try:
            table = read(True)
        except pa.ArrowInvalid as err:
            if "invalid UTF8" not in str(err) or invalid:
                raise
            # A later block has bytes that are not UTF-8 in a column read as text: read every column as
            # bytes and find the row below.
            table = read(True, {column: pa.binary() for column in wanted})
    except pa.ArrowInvalid as err:
        if not invalid:
            raise DataError(f"{path}: cannot be read as {fmt.upper()}: {err}") from None
        row = invalid[0]
        if row.number is None:  # threaded parsing knows no line numbers: parse again in one thread
            invalid.clear()
            try:
                read(False)
            except pa.ArrowInvalid:
                pass
            row = invalid[0] if invalid else row
        line = f"{path}:{row.number}" if row.number is not None else f"{path}"
        raise DataError(f"{line}: expected {row.expected_columns} fields separated by {delimiter!r}, found "
                        f"{row.actual_columns}: {row.text[:80]!r}") from None
    if table.num_rows == 0 and not invalid:
        raise DataError(f"{path}: no rows after the header" if spec.header else f"{path}: the file is empty")
    return _convert(table, spec, _Rows(path, "csv", first_line), skipped=len(invalid))


def _header(path: Path, csv, parse: dict) -> list[str]:
    with pa.input_stream(str(path), compression="detect") as stream:  # .csv.gz etc. too
        head = stream.read(1 << 20)
    line = head.split(b"\n", 1)[0]
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:1: the header is not UTF-8 text (byte {line[err.start]:#04x} at "
                        f"offset {err.start})") from None
    if not line.strip(b"\r\n\xef\xbb\xbf \t"):
        raise DataError(f"{path}:1: the header line is empty; the first line must name the columns")
    try:
        table = csv.read_csv(io.BytesIO(line + b"\n"), parse_options=csv.ParseOptions(**parse))
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}:1: cannot read the header: {err}") from None
    return table.column_names


def _read_parquet(path: Path, spec: TableSpec) -> _Log:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a Parquet file ({err})") from None
    present = parquet.schema_arrow.names
    _check_columns(path, present, spec)
    wanted = list(dict.fromkeys(_columns(spec).values()))
    groups, sizes = [], []
    for group in range(parquet.num_row_groups):  # one row group at a time: only the wanted columns
        try:
            groups.append(parquet.read_row_group(group, columns=wanted))
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: row group {group} cannot be read: {err}") from None
        sizes.append(groups[-1].num_rows)
    if sum(sizes) == 0:
        raise DataError(f"{path}: the file has no rows")
    table = pa.concat_tables(groups)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return _convert(table, spec, _Rows(path, "parquet", group_starts=starts), skipped=0)


# ---------------------------------------------------------------- columns -> codes


def _convert(table: pa.Table, spec: TableSpec, rows: _Rows, skipped: int) -> _Log:
    """Checks every value, drops or reports bad rows, and encodes the ids."""
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    problems: list[tuple[int, str]] = []  # (first bad row index, message) per check

    def flag(mask: np.ndarray, message) -> None:
        nonlocal bad
        if mask.any():
            first = int(np.argmax(mask))
            problems.append((first, message(first)))
            bad |= mask

    roles = _columns(spec)
    columns = {role: table.column(name) for role, name in roles.items()}
    nulls = [columns[role].is_null().to_numpy(zero_copy_only=False) for role in columns]
    empty_line = np.logical_and.reduce(nulls)
    flag(empty_line, lambda i: "empty line")
    for role, is_null in zip(columns, nulls):
        label = role if role in ("timestamp", "rating") else f"{role} id"
        flag(is_null & ~empty_line, lambda i, label=label, role=role: f"the {label} (column {roles[role]!r}) is empty")
    for role, column in columns.items():
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            values, not_text = _utf8(column)
            columns[role] = values
            flag(not_text, lambda i, role=role, column=column: (
                f"column {roles[role]!r} is not UTF-8 text: {column[i].as_py()!r}"))
    times = None
    if "timestamp" in columns:
        times, unparseable = _seconds(columns["timestamp"])
        flag(unparseable & ~bad, lambda i: (
            f"timestamp {_text(columns['timestamp'][i])!r} (column {roles['timestamp']!r}) is neither integer "
            "epoch seconds nor an ISO-8601 date-time"))
    rating = None
    if "rating" in columns:
        numeric = pa.types.is_integer(columns["rating"].type) or pa.types.is_floating(columns["rating"].type)
        flag(np.full(n, not numeric) & ~bad, lambda i: (
            f"rating {_text(columns['rating'][i])!r} (column {roles['rating']!r}) is not a number"))
        if numeric:
            rating = columns["rating"].cast(pa.float64()).fill_null(0).to_numpy()
    if problems:
        if spec.on_bad_rows == "error":
            first, message = min(problems)
            raise DataError(f"{rows.where(first)}: {message}; fix the row, or set data.on_bad_rows=skip to "
                            "drop such rows")
        keep = ~bad
        first, message = min(problems)
        logger.warning("%s: skipped %d bad rows (data.on_bad_rows=skip); the first: %s: %s", rows.path,
                       int(bad.sum()) + skipped, rows.where(first), message)
        mask = pa.array(keep)
        columns = {role: column.filter(mask) for role, column in columns.items()}
        times = None if times is None else times[keep]
        rating = None if rating is None else rating[keep]
    elif skipped:
        logger.warning("%s: skipped %d rows with the wrong number of fields (data.on_bad_rows=skip)",
                       rows.path, skipped)
    if len(columns["user"]) == 0:
        raise DataError(f"{rows.path}: no valid rows: all {n + skipped} rows are bad")
    user, user_vocab = _encode(columns["user"])
    item, item_vocab = _encode(columns["item"])
    return _Log(user=user, item=item, timestamp=times, rating=rating, user_vocab=user_vocab, item_vocab=item_vocab,
                bad_rows=int(bad.sum()) + skipped)


def _utf8(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Bytes -> (text, with null where the bytes are not UTF-8; the mask of those)."""
    values = column.to_pylist()
    text, not_text = [], np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        try:
            text.append(None if value is None else value.decode("utf-8"))
        except UnicodeDecodeError:
            text.append(None)
            not_text[i] = True
    return pa.chunked_array([pa.array(text, type=pa.string())]), not_text


def _text(value) -> str:
    value = value.as_py()
    return value if isinstance(value, str) else str(value)


def _seconds(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A time column -> (int64 unix seconds, mask of values that are no time). Nulls are flagged elsewhere."""
    kind = column.type
    valid = ~column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind):
        return column.cast(pa.int64()).fill_null(0).to_numpy(), np.zeros(len(column), dtype=bool)
    if pa.types.is_timestamp(kind):
        raw = column.cast(pa.int64()).fill_null(0).to_numpy()
        return raw // _UNIT_PER_SECOND[kind.unit], np.zeros(len(column), dtype=bool)
    if pa.types.is_date(kind):
        return _seconds(column.cast(pa.timestamp("s")))
    if pa.types.is_floating(kind):
        values = column.fill_null(0).to_numpy()
        whole = np.isfinite(values) & (np.floor(values) == values)
        return np.where(whole, values, 0).astype(np.int64), ~whole & valid
    # Text (a mix of formats, or junk): each value is an integer or an ISO-8601 date-time.
    values = column.cast(pa.string()).to_pylist()
    seconds = np.zeros(len(values), dtype=np.int64)
    bad = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        if value is None:
            continue
        parsed = _parse_time(value)
        if parsed is None:
            bad[i] = True
        else:
            seconds[i] = parsed
    return seconds, bad


def _parse_time(value: str) -> int | None:
    if _INTEGER.fullmatch(value):
        number = int(value)
        return number if -(2**63) <= number < 2**63 else None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() // 1)


def _encode(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids -> (int64 codes, the sorted distinct raw ids: int64, or str in an object array)."""
    if pa.types.is_integer(column.type):
        column = column.cast(pa.int64())
    elif not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    distinct = pc.unique(column)
    distinct = distinct.take(pc.sort_indices(distinct))
    codes = pc.index_in(column, value_set=distinct).to_numpy().astype(np.int64)
    if pa.types.is_integer(column.type):
        vocab = distinct.to_numpy()
    else:
        vocab = np.array(distinct.to_pylist(), dtype=object)
    return codes, vocab


# ---------------------------------------------------------------- filters, order, remap


def _build(name: str, log: _Log, drop_duplicates: bool, min_user: int, min_item: int,
           min_actions: int = MIN_ACTIONS) -> Interactions:
    user, item, times = log.user, log.item, log.timestamp
    report = {"rows_read": len(user) + log.bad_rows, "bad_rows_skipped": log.bad_rows, "duplicates_dropped": 0}
    order = _time_order(user, times)  # the one sort of the rows: every filter below is a mask
    keep = np.ones(len(user), dtype=bool)
    if drop_duplicates:
        keep[_duplicates(user, item, times, order)] = False
        report["duplicates_dropped"] = int((~keep).sum())
    before = int(keep.sum())
    keep, rounds = _k_core(user, item, keep, len(log.user_vocab), len(log.item_vocab), min_user, min_item)
    report.update(kcore_rows_dropped=before - int(keep.sum()), kcore_rounds=rounds)
    counts = np.bincount(user[keep], minlength=len(log.user_vocab))
    short = (counts > 0) & (counts < min_actions)
    short_rows = keep & short[user]
    report.update(short_users_dropped=int(short.sum()), short_user_rows_dropped=int(short_rows.sum()))
    keep &= ~short_rows
    if not keep.any():
        raise DataError(f"{name}: no user is left with {max(min_actions, 1)} actions after the filters "
                        f"({_describe(report)}); lower data.min_user_interactions / data.min_item_interactions")
    order = order[keep[order]]
    user, item = user[order], item[order]
    times = None if times is None else times[order]
    present = np.zeros(len(log.item_vocab), dtype=bool)
    present[item] = True
    item = np.cumsum(present)[item]  # code -> 1..N, ascending raw id
    starts = np.flatnonzero(np.diff(user)) + 1
    item_vocab = log.item_vocab[present]
    pad = np.array([-1], dtype=np.int64) if item_vocab.dtype != object else np.array([None], dtype=object)
    users = log.user_vocab[user[np.concatenate(([0], starts))]]
    report.update(users=int(len(users)), items=int(len(item_vocab)), interactions=int(len(item)))
    logger.info("%s: %s", name, _describe(report))
    return Interactions(
        name=name,
        sequences=np.split(item, starts),
        timestamps=None if times is None else np.split(times, starts),
        num_items=int(len(item_vocab)),
        raw_item_ids=np.concatenate((pad, item_vocab)),
        raw_user_ids=users,
        report=report,
    )


def _time_order(user: np.ndarray, times: np.ndarray | None) -> np.ndarray:
    """The permutation sorting rows by (user, time), ties in file order: one stable argsort of a combined int64
    key (several times faster than np.lexsort on millions of rows); lexsort only when the key would overflow."""
    if times is None:
        return np.argsort(user, kind="stable")
    users = int(user.max()) + 1
    offset = times - times.min()
    span = int(offset.max()) + 1
    if users * span >= 2**63:  # times too far apart: their ranks instead
        distinct, offset = np.unique(times, return_inverse=True)
        offset, span = offset.reshape(-1), len(distinct)
        if users * span >= 2**63:
            return np.lexsort((times, user))
    return np.argsort(user.astype(np.int64) * span + offset, kind="stable")


def _duplicates(user: np.ndarray, item: np.ndarray, times: np.ndarray | None, order: np.ndarray) -> np.ndarray:
    """The rows equal (user, item, time) to an earlier row of the file. Only runs of equal (user, time) in
    `order` can hold duplicates; those rows alone are sorted again by item (stably: file order kept)."""
    u = user[order]
    same = u[1:] == u[:-1]
    if times is not None:
        t = times[order]
        same &= t[1:] == t[:-1]
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    positions = np.flatnonzero(in_run)
    run = np.cumsum(np.concatenate(([True], ~same)))[positions]
    rows = order[positions]
    by_item = np.lexsort((item[rows], run))  # stable: within equal (run, item), file order
    rows, run, items = rows[by_item], run[by_item], item[rows][by_item]
    repeat = np.zeros(len(rows), dtype=bool)
    repeat[1:] = (run[1:] == run[:-1]) & (items[1:] == items[:-1])
    return rows[repeat]


def _k_core(user: np.ndarray, item: np.ndarray, keep: np.ndarray, num_users: int, num_items: int,
            min_user: int, min_item: int) -> tuple[np.ndarray, int]:
    """The rows of `keep` in the k-core (every user >= min_user rows, every item >= min_item) and the rounds
    it took."""
    rounds = 0
    if min_user <= 1 and min_item <= 1:
        return keep, rounds
    while True:
        rounds += 1
        user_ok = np.bincount(user[keep], minlength=num_users) >= min_user
        item_ok = np.bincount(item[keep], minlength=num_items) >= min_item
        still = keep & user_ok[user] & item_ok[item]
        if still.sum() == keep.sum():
            return keep, rounds
        keep = still


def _describe(report: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in report.items())


def source_digest(path: str | os.PathLike, options: dict) -> str:
    """sha256 of the file's bytes and the reading/filter options: what identifies the dataset trained on."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            hasher.update(chunk)
    hasher.update(repr(sorted(options.items())).encode())
    return hasher.hexdigest()
