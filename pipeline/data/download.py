"""Where each dataset's files live, how to fetch the official release, and `load_interactions`.

Layout under the data root (the same as the project's shared data folder, so pointing
GENREC_DATA_ROOT at it works):

    ml-1m/sequences.txt or ml-1m/ratings.dat
    ml-100k/u.data
    amazon-5core/Beauty.txt
    amazon-5core/Toys_and_Games.txt

A missing file is downloaded from its official source when allowed, checked against a pinned
checksum (so a changed or corrupted release is noticed, not trained on) and written atomically (so
an interrupted download never leaves a partial file that a later run would trust).

The GroupLens ratings files are read by the same reader as a user's own log (`data=interactions`,
pipeline.data.interactions): one path from a table to `Interactions`. The one-user-per-line sequence
files are not tables and keep their own reader.
"""

import contextlib
import hashlib
import inspect
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from tqdm import tqdm

from pipeline.core import file_digest
from pipeline.data.readers import (
    DataError,
    Interactions,
    interactions_from_sequences,
    read_user_sequences,
)
from pipeline.data.interactions import TableSpec, read_interactions
from pipeline.data.synthetic import generate_synthetic

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO_ROOT / "artifacts" / "data"
DATA_ROOT_ENV = "GENREC_DATA_ROOT"
_S3REC = "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/e6c774da92dba847b00ac89e8bfc5c55cc44d378/data"
_CHUNK_BYTES = 1 << 20


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing and cannot be downloaded; the message says what goes where."""


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset.

    Attributes:
        path: the file's path relative to the data root.
        sep: the field separator of a GroupLens ratings file; None for a one-user-per-line
            sequence file, which has no ratings.
    """

    path: str
    sep: str | None = None


@dataclass(frozen=True)
class DatasetSource:
    """A dataset's official download and the local files it can be read from.

    Attributes:
        official: the file the official download provides.
        url: the official download: the file itself, or a zip archive holding it as `member`.
        algorithm: the hashlib name of the checksum of what `url` serves.
        digest: that checksum, hex.
        member: the path of `official` inside the zip archive; None when `url` is the file.
        preferred: files read instead of `official` when present and no rating filter is asked
            for (same interactions, already in sequence form).
    """

    official: DataFile
    url: str
    algorithm: str
    digest: str
    member: str | None = None
    preferred: tuple[DataFile, ...] = ()


DATASETS: dict[str, DatasetSource] = {
    "ml-1m": DatasetSource(
        official=DataFile("ml-1m/ratings.dat", sep="::"),
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        algorithm="md5",
        digest="c4d9eecfca2ab87c1945afe126590906",
        member="ml-1m/ratings.dat",
        preferred=(DataFile("ml-1m/sequences.txt"),),
    ),
    "ml-100k": DatasetSource(
        official=DataFile("ml-100k/u.data", sep="\t"),
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        algorithm="md5",
        digest="0e33842e24a9c977be4e0107933c0723",
        member="ml-100k/u.data",
    ),
    "amazon-beauty": DatasetSource(
        official=DataFile("amazon-5core/Beauty.txt"),
        url=f"{_S3REC}/Beauty.txt",
        algorithm="sha256",
        digest="226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
    ),
    "amazon-toys": DatasetSource(
        official=DataFile("amazon-5core/Toys_and_Games.txt"),
        url=f"{_S3REC}/Toys_and_Games.txt",
        algorithm="sha256",
        digest="176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
    ),
}
SYNTHETIC = "synthetic"
INTERACTIONS = "interactions"
DATASET_NAMES = (SYNTHETIC, *DATASETS, INTERACTIONS)


def load_interactions(cfg: Any) -> Interactions:
    """Loads the dataset a data config names, downloading the official files when needed.

    Args:
        cfg: a DictConfig or any object with attributes `name`, and optionally `root` (None:
            $GENREC_DATA_ROOT, else <repo>/artifacts/data), `download` (default True),
            `min_rating` (GroupLens ratings only; None keeps every rating) and `synthetic`
            (the keyword arguments of `generate_synthetic`).

    Raises:
        ValueError: an unknown name, an unknown synthetic option, or a rating filter for a
            dataset without ratings.
        DatasetNotFoundError: the files are missing and download is off or failed.
        DataError: a file is malformed, or a download does not match its checksum.
    """
    name = cfg.name
    if name == SYNTHETIC:
        return generate_synthetic(**_synthetic_options(getattr(cfg, "synthetic", None)))
    if name == INTERACTIONS:
        return load_table(cfg)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    source = DATASETS[name]
    min_rating = _option(cfg, "min_rating", None)
    if min_rating is not None and source.official.sep is None:
        raise DataError(
            f"min_rating={min_rating} was given, but {name} has no ratings (its files list only "
            "the items each user interacted with); set min_rating to null"
        )
    root = data_root(_option(cfg, "root", None))
    file = find_or_download(
        name, root, download=_option(cfg, "download", True), needs_ratings=min_rating is not None
    )
    interactions = _read(name, file, root / file.path, min_rating)
    logger.info(
        "%s: %d users, %d items, %d interactions from %s",
        name,
        interactions.num_users,
        interactions.num_items,
        interactions.num_interactions,
        root / file.path,
    )
    return interactions


def table_spec(cfg: Any) -> tuple[TableSpec, dict[str, Any]]:
    """The `data=interactions` config -> (how to read the file, the filter options)."""
    path = _option(cfg, "path", None)
    if not path:
        raise DataError("data=interactions needs data.path: the CSV, TSV or Parquet file of your interactions, "
                        "e.g. data.path=interactions.csv")
    columns = _option(cfg, "columns", {})
    get = columns.get if hasattr(columns, "get") else lambda key, default: getattr(columns, key, default)
    names = _option(cfg, "column_names", None)
    spec = TableSpec(
        path=str(Path(str(path)).expanduser().resolve()),
        format=_option(cfg, "format", None),
        user=str(get("user", "user_id")),
        item=str(get("item", "item_id")),
        timestamp=None if get("timestamp", "timestamp") is None else str(get("timestamp", "timestamp")),
        header=bool(_option(cfg, "header", True)),
        column_names=None if names is None else tuple(str(n) for n in names),
        delimiter=_option(cfg, "delimiter", None),
        on_bad_rows=str(_option(cfg, "on_bad_rows", "error")),
    )
    filters = {
        "drop_duplicates": bool(_option(cfg, "drop_duplicates", False)),
        "min_user_interactions": _option(cfg, "min_user_interactions", 1),
        "min_item_interactions": _option(cfg, "min_item_interactions", 1),
    }
    return spec, filters


_TABLE_CACHE: dict[tuple, Interactions] = {}


def load_table(cfg: Any, name: str = INTERACTIONS) -> Interactions:
    """Reads the log a `data=interactions` config names; the stages of one run read it once (the file's
    size and modification time are part of the key, so a changed file is read again)."""
    spec, filters = table_spec(cfg)
    path = Path(spec.path)
    stat = path.stat() if path.is_file() else None
    key = (spec, tuple(sorted(filters.items())), name, stat and (stat.st_size, stat.st_mtime_ns))
    if stat is not None and key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    interactions = read_interactions(spec, name, **filters)
    _TABLE_CACHE.clear()
    _TABLE_CACHE[key] = interactions
    return interactions


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder of the dataset folders: `root`, else $GENREC_DATA_ROOT, else artifacts/data."""
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(root).expanduser()


def find_or_download(
    name: str, root: Path, download: bool = True, needs_ratings: bool = False
) -> DataFile:
    """The first of the dataset's files under `root`; downloads the official one if none is there.

    Args:
        needs_ratings: only files with ratings qualify (a rating filter was asked for).
    """
    source = DATASETS[name]
    candidates = (source.official,) if needs_ratings else (*source.preferred, source.official)
    for file in candidates:
        if (root / file.path).is_file():
            return file
    if not download:
        message = _not_found_message(name, root, candidates, needs_ratings)
        raise DatasetNotFoundError(f"{message}; or set download: true in the data config")
    try:
        fetch(source, root)
    except OSError as error:  # no network, HTTP error, unwritable root
        message = _not_found_message(name, root, candidates, needs_ratings)
        raise DatasetNotFoundError(f"{message} (the download failed: {error})") from error
    return source.official


def fetch(source: DatasetSource, root: Path) -> None:
    """Downloads the official release of a dataset under `root` and unpacks the file it needs.

    A zip archive is kept beside the dataset folders, so that unpacking again needs no network.
    """
    destination = root / source.official.path
    if source.member is None:
        download_file(source.url, destination, source.algorithm, source.digest)
        return
    archive = root / Path(urlparse(source.url).path).name
    if archive.is_file():
        _check_digest(
            archive, source.algorithm, source.digest, file_digest([archive], source.algorithm)
        )
    else:
        download_file(source.url, archive, source.algorithm, source.digest)
    _extract(archive, source.member, destination)


def download_file(url: str, destination: Path, algorithm: str, digest: str) -> None:
    """Downloads `url` to `destination` with a progress bar, if its checksum is `digest`.

    Raises:
        DataError: the checksum differs; nothing is left at `destination`.
        OSError: the download failed (urllib.error.URLError is an OSError).
    """
    logger.info("downloading %s to %s", url, destination)
    hasher = hashlib.new(algorithm)
    with _atomic_write(destination) as out, urllib.request.urlopen(url, timeout=60) as response:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=size, unit="B", unit_scale=True, desc=destination.name, disable=None
        ) as progress:
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                hasher.update(chunk)
                progress.update(len(chunk))
        _check_digest(destination, algorithm, digest, hasher.hexdigest(), url=url)


@contextlib.contextmanager
def _atomic_write(destination: Path) -> Iterator[BinaryIO]:
    """Yields a temporary file beside `destination` that replaces it only if the block completes."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_digest(
    path: Path, algorithm: str, expected: str, actual: str, url: str | None = None
) -> None:
    if actual == expected:
        return
    if url is None:
        fix = "delete it and run again to download it afresh"
    else:
        fix = f"it was deleted; retry, and if it fails again the file at {url} has changed"
    raise DataError(
        f"{path}: {algorithm} checksum mismatch: expected {expected}, got {actual}; {fix}"
    )


def _extract(archive: Path, member: str, destination: Path) -> None:
    with zipfile.ZipFile(archive) as zipped:
        try:
            info = zipped.getinfo(member)
        except KeyError:
            raise DataError(
                f"{archive}: the archive has no {member}; delete it and run again"
            ) from None
        with zipped.open(info) as packed, _atomic_write(destination) as out:
            shutil.copyfileobj(packed, out, _CHUNK_BYTES)


def _not_found_message(
    name: str, root: Path, candidates: tuple[DataFile, ...], needs_ratings: bool
) -> str:
    source = DATASETS[name]
    expected = " or ".join(str(root / file.path) for file in candidates)
    official = root / source.official.path
    if source.member is None:
        how = f"download {source.url} to {official}"
    else:
        how = f"download {source.url} and unzip {source.member} from it to {official}"
    why = ""
    if needs_ratings and source.preferred:
        why = f" (min_rating is set, and only {source.official.path} has ratings)"
    return (
        f"dataset {name!r} not found: expected {expected}{why}. To fix: {how}; "
        f"or point root (or ${DATA_ROOT_ENV}) at a folder that has it"
    )


def _read(name: str, file: DataFile, path: Path, min_rating: int | None) -> Interactions:
    if file.sep is None:
        users, sequences = read_user_sequences(path)
        return interactions_from_sequences(name, users, sequences)
    return read_interactions(ratings_spec(path, file.sep), name, min_rating=min_rating, min_actions=1)


def ratings_spec(path: Path, sep: str) -> TableSpec:
    """A GroupLens ratings file (user, item, rating, timestamp; no header) as a table the log reader reads.

    ML-1M's "::" is read as ":" with an empty column between the fields (pyarrow's delimiter is one byte);
    the ids are integers, so no field holds a ":"."""
    names = ("user", "item", "rating", "timestamp")
    if sep == "::":
        sep, names = ":", ("user", "_1", "item", "_2", "rating", "_3", "timestamp")
    return TableSpec(path=str(path), format="csv", user="user", item="item", timestamp="timestamp",
                     rating="rating", header=False, column_names=names, delimiter=sep)


def _option(cfg: Any, key: str, default: Any) -> Any:
    value = getattr(cfg, key, None)
    return default if value is None else value


def _synthetic_options(section: Any) -> dict[str, Any]:
    """The `synthetic` config section as keyword arguments of `generate_synthetic`.

    A key set to None keeps the default.
    """
    if section is None:
        return {}
    # A DictConfig or a plain dict (as a checkpoint saves it), or an object with attributes.
    options = dict(section.items()) if hasattr(section, "keys") else dict(vars(section))
    valid = inspect.signature(generate_synthetic).parameters
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(
            f"unknown synthetic option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
    return {key: value for key, value in options.items() if value is not None}
