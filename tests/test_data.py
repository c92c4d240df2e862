"""Tests of pipeline.data: readers, remapping, leave-one-out splits, synthetic data, loading.

Real datasets are read from $GENREC_SHARED_DATA (default <repo>/../shared/data) and their tests skip
when it is absent. Nothing here touches the network: downloads are tested against file:// URLs.
"""

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.data import (
    DATASET_NAMES,
    DataError,
    DatasetNotFoundError,
    Interactions,
    generate_synthetic,
    interactions_from_ratings,
    interactions_from_sequences,
    leave_one_out,
    load_interactions,
    read_grouplens_ratings,
    read_user_sequences,
    readers,
)
from pipeline.data import download as download_module

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GENREC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def same_arrays(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    return len(first) == len(second) and all(map(np.array_equal, first, second))


def assert_tensor(actual: torch.Tensor, expected: list) -> None:
    assert actual.dtype == torch.int64
    assert actual.tolist() == expected


# ---------------------------------------------------------------- GroupLens ratings


@pytest.mark.parametrize("sep, name", [("::", "ratings.dat"), ("\t", "u.data")])
@pytest.mark.parametrize("final_newline", [True, False])
def test_read_grouplens_ratings(tmp_path, sep, name, final_newline):
    rows = [(1, 1193, 5, 978300760), (1, 661, 3, 978302109), (2, -7, 4, 978298413)]
    text = "\n".join(sep.join(map(str, row)) for row in rows) + ("\n" if final_newline else "")
    columns = read_grouplens_ratings(write(tmp_path, name, text), sep)
    assert len(columns) == 4
    for column, expected in zip(columns, zip(*rows, strict=True), strict=True):
        assert column.dtype == np.int64
        assert column.tolist() == list(expected)


def test_read_grouplens_ratings_tolerates_crlf_and_blanks_around_fields(tmp_path):
    path = write(tmp_path, "ratings.dat", "1 :: 2::3:: 4\r\n5::6::7::8\r\n")
    assert [column.tolist() for column in read_grouplens_ratings(path, "::")] == [
        [1, 5],
        [2, 6],
        [3, 7],
        [4, 8],
    ]


def test_fast_ratings_parser_agrees_with_line_by_line():
    """The vectorized path must read exactly what the line-by-line reader reads."""
    rng = np.random.default_rng(0)
    rows = rng.integers(-(10**12), 10**12, size=(500, 4))
    rows[:5] = [
        [0, 0, 0, 0],
        [-1, 7, 0, 12],
        [10**17, -(10**16), 5, 3],
        [1, 1, 1, 1],
        [99, 98, 97, 96],
    ]
    for sep in ("::", "\t"):
        text = "".join(sep.join(map(str, row)) + "\n" for row in rows.tolist())
        fast = readers._parse_ratings_fast(text, sep)
        assert fast is not None
        assert np.array_equal(fast, rows)
        assert np.array_equal(readers._parse_ratings_by_line("mem", text, sep), rows)


@pytest.mark.parametrize(
    "text, lineno, fragment",
    [
        ("1::2::3::4\n1::x::3::4\n", 2, "item is 'x', not an integer"),
        ("1::2::3::4\n1::2::3.5::4\n", 2, "rating is '3.5', not an integer"),
        ("1::-::3::4\n", 1, "item is '-', not an integer"),
        (
            "1::2::3::99999999999999999999\n",
            1,
            "timestamp is '99999999999999999999', not an integer",
        ),
        ("1::2::3::4\n1::2::3::4::5\n1::2::3::4\n", 2, "expected 4 fields"),
        ("1::2::3\n1::2::3::4\n", 1, "found 3"),
        ("1::2::3::4\n\n1::2::3::4\n", 2, "empty line"),
        ("1::2::3::4\n1::2::3::4\n1::2::3", 3, "truncated"),
        ("1::2::3::4\n1::2::3::", 2, "truncated"),
        ("1\t2\t3\t4\n", 1, "found 1"),
        ("", 1, "empty"),
        (" \n\n", 1, "empty"),
    ],
)
def test_read_grouplens_ratings_reports_file_and_line(tmp_path, text, lineno, fragment):
    path = write(tmp_path, "ratings.dat", text)
    with pytest.raises(DataError) as error:
        read_grouplens_ratings(path, "::")
    message = str(error.value)
    assert message.startswith(f"{path}:{lineno}: ")
    assert fragment in message


# ---------------------------------------------------------------- user sequences


def test_read_user_sequences(tmp_path):
    users, sequences = read_user_sequences(write(tmp_path, "Beauty.txt", "10 5 3 7\n2\t7  7 1\n"))
    assert users.dtype == np.int64 and users.tolist() == [10, 2]
    assert [sequence.tolist() for sequence in sequences] == [[5, 3, 7], [7, 7, 1]]
    assert all(sequence.dtype == np.int64 for sequence in sequences)


@pytest.mark.parametrize(
    "text, lineno, fragment",
    [
        ("1 2 3\n2 4 b 6\n", 2, "item 2 is 'b', not an integer"),
        ("1 2 3\nu2 4\n", 2, "the user id is 'u2'"),
        ("1 2 99999999999999999999\n", 1, "item 2 is '99999999999999999999', not an integer"),
        ("1 2 3\n2 4\n3\n", 3, "user 3 has no items"),
        ("1 2 3\n2 4\n1 5\n", 3, "user 1 already has a line"),
        ("1 2 3\n\n2 4\n", 2, "empty line"),
        ("", 1, "empty"),
    ],
)
def test_read_user_sequences_reports_file_and_line(tmp_path, text, lineno, fragment):
    path = write(tmp_path, "sequences.txt", text)
    with pytest.raises(DataError) as error:
        read_user_sequences(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{lineno}: ")
    assert fragment in message
    if "already has a line" in fragment:
        assert f"{path}:1" in message.removeprefix(f"{path}:{lineno}: ")


# ---------------------------------------------------------------- remapping and ordering


def columns(rows):
    return tuple(np.array(column, dtype=np.int64) for column in zip(*rows, strict=True))


def test_interactions_from_ratings_orders_by_time_and_remaps():
    # (user, item, rating, timestamp), in file order; users 7 and 3 interleaved.
    rows = [
        (7, 300, 5, 20),
        (3, 100, 4, 5),
        (7, 100, 3, 10),
        (7, 200, 1, 20),
        (3, 300, 2, 1),
        (7, 50, 5, 20),
    ]
    interactions = interactions_from_ratings("toy", *columns(rows))
    assert interactions.raw_user_ids.tolist() == [3, 7]
    assert interactions.raw_item_ids.tolist() == [-1, 50, 100, 200, 300]
    assert (
        interactions.num_items == 4
        and interactions.num_users == 2
        and interactions.num_interactions == 6
    )
    # Ties at t=20 keep file order 300, 200, 50.
    raw = [interactions.raw_item_ids[sequence].tolist() for sequence in interactions.sequences]
    assert raw == [[300, 100], [100, 300, 200, 50]]
    assert [sequence.tolist() for sequence in interactions.sequences] == [[4, 2], [2, 4, 3, 1]]
    assert [times.tolist() for times in interactions.timestamps] == [[1, 5], [10, 20, 20, 20]]


def test_interactions_from_ratings_min_rating():
    rows = [(1, 10, 5, 1), (1, 20, 2, 2), (2, 30, 4, 3), (2, 10, 3, 4), (3, 40, 1, 5)]
    interactions = interactions_from_ratings("toy", *columns(rows), min_rating=4)
    assert interactions.raw_user_ids.tolist() == [1, 2]
    assert interactions.raw_item_ids.tolist() == [-1, 10, 30]
    assert [sequence.tolist() for sequence in interactions.sequences] == [[1], [2]]
    with pytest.raises(ValueError, match="min_rating=6"):
        interactions_from_ratings("toy", *columns(rows), min_rating=6)


def test_interactions_from_sequences_remaps_ascending():
    interactions = interactions_from_sequences(
        "toy", np.array([5, 1]), [np.array([40, 10, 30]), np.array([10, 20])]
    )
    assert interactions.timestamps is None
    assert interactions.raw_user_ids.tolist() == [5, 1]
    assert interactions.raw_item_ids.tolist() == [-1, 10, 20, 30, 40]
    assert [sequence.tolist() for sequence in interactions.sequences] == [[4, 1, 3], [1, 2]]
    assert interactions.num_items == 4 and interactions.num_interactions == 5


# ---------------------------------------------------------------- leave-one-out


def toy_interactions(with_timestamps: bool) -> Interactions:
    """Four users with item ids used as they are (1..18); each timestamp is 100 x its item id."""
    lists = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [1, 2], [11, 12, 13, 14, 15, 16, 17, 18]]
    sequences = [np.array(items, dtype=np.int64) for items in lists]
    return Interactions(
        name="toy",
        sequences=sequences,
        timestamps=[100 * items for items in sequences] if with_timestamps else None,
        num_items=18,
        raw_item_ids=np.concatenate(([-1], np.arange(1, 19))),
        raw_user_ids=np.arange(len(sequences)),
    )


def test_leave_one_out_exact_tensors():
    splits = leave_one_out(toy_interactions(with_timestamps=True), max_len=3)
    assert splits.num_items == 18
    # User 2 (2 items) is dropped; user 1's training part [7] is too short to train on.
    assert_tensor(splits.train.items, [[1, 2, 3, 4], [13, 14, 15, 16]])
    assert_tensor(splits.train.lengths, [4, 4])
    assert_tensor(splits.train.timestamps, [[100, 200, 300, 400], [1300, 1400, 1500, 1600]])

    assert_tensor(splits.valid.history, [[2, 3, 4], [7, 0, 0], [14, 15, 16]])
    assert_tensor(splits.valid.lengths, [3, 1, 3])
    assert_tensor(splits.valid.target, [5, 8, 17])
    assert_tensor(splits.valid.timestamps, [[200, 300, 400], [700, 0, 0], [1400, 1500, 1600]])
    assert_tensor(splits.valid.target_timestamps, [500, 800, 1700])

    assert_tensor(splits.test.history, [[3, 4, 5], [7, 8, 0], [15, 16, 17]])
    assert_tensor(splits.test.lengths, [3, 2, 3])
    assert_tensor(splits.test.target, [6, 9, 18])
    assert_tensor(splits.test.timestamps, [[300, 400, 500], [700, 800, 0], [1500, 1600, 1700]])
    assert_tensor(splits.test.target_timestamps, [600, 900, 1800])


def test_leave_one_out_short_training_part_and_no_timestamps():
    splits = leave_one_out(toy_interactions(with_timestamps=False), max_len=10)
    assert_tensor(splits.train.items[:, :7], [[1, 2, 3, 4, 0, 0, 0], [11, 12, 13, 14, 15, 16, 0]])
    assert splits.train.items.shape == (2, 11)
    assert_tensor(splits.train.lengths, [4, 6])
    assert_tensor(splits.test.history[1], [7, 8] + [0] * 8)
    assert splits.train.timestamps is None
    assert splits.valid.timestamps is None and splits.valid.target_timestamps is None
    assert splits.test.timestamps is None and splits.test.target_timestamps is None


@pytest.mark.parametrize("max_len", [0, -1, True, 2.5])
def test_leave_one_out_rejects_bad_max_len(max_len):
    with pytest.raises(ValueError, match="max_len"):
        leave_one_out(toy_interactions(with_timestamps=False), max_len=max_len)


def test_leave_one_out_needs_a_user_with_three_items():
    interactions = interactions_from_sequences("tiny", np.array([1]), [np.array([1, 2])])
    with pytest.raises(ValueError, match="3 interactions"):
        leave_one_out(interactions, max_len=5)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_seeded():
    first, again, other = (
        generate_synthetic(seed=3),
        generate_synthetic(seed=3),
        generate_synthetic(seed=4),
    )
    assert same_arrays(first.sequences, again.sequences)
    assert same_arrays(first.timestamps, again.timestamps)
    assert not same_arrays(first.sequences, other.sequences)


def test_synthetic_shapes_and_ranges():
    data = generate_synthetic(
        num_users=300, num_items=200, min_len=5, max_len=40, num_clusters=4, seed=1
    )
    assert data.num_users == 300 and data.num_items == 200 and len(data.raw_user_ids) == 300
    assert data.raw_item_ids[0] == -1 and data.raw_item_ids[1:].tolist() == list(range(1, 201))
    for sequence, times in zip(data.sequences, data.timestamps, strict=True):
        assert sequence.dtype == np.int64 and times.dtype == np.int64
        assert 5 <= len(sequence) <= 40 and len(times) == len(sequence)
        assert sequence.min() >= 1 and sequence.max() <= 200
        assert len(np.unique(sequence)) == len(sequence), (
            "evaluation filters seen items, so none may repeat"
        )
        assert (np.diff(times) > 0).all()


def test_synthetic_has_sequential_signal():
    """Predicting the most frequent follower of the last item beats popularity many times over."""
    splits = leave_one_out(generate_synthetic(), max_len=50)
    num_ids = splits.num_items + 1
    items, lengths = splits.train.items.numpy(), splits.train.lengths.numpy()
    is_pair = np.arange(items.shape[1] - 1) < (lengths[:, None] - 1)
    follows = np.zeros((num_ids, num_ids))
    np.add.at(follows, (items[:, :-1][is_pair], items[:, 1:][is_pair]), 1)
    popularity = np.bincount(items[items > 0], minlength=num_ids).astype(float)

    history, target = splits.test.history.numpy(), splits.test.target.numpy()
    last = history[np.arange(len(history)), splits.test.lengths.numpy() - 1]
    top10_sequential = np.argsort(-(follows[last] + 1e-6 * popularity), axis=1)[:, :10]
    hr10_sequential = (top10_sequential == target[:, None]).any(axis=1).mean()
    hr10_popular = np.isin(target, np.argsort(-popularity)[:10]).mean()
    assert hr10_sequential > 0.3
    assert hr10_sequential > 5 * hr10_popular


@pytest.mark.parametrize(
    "arguments",
    [
        dict(num_clusters=0),
        dict(min_len=0),
        dict(min_len=9, max_len=8),
        dict(max_len=2000),
        dict(markov_p=1.5),
    ],
)
def test_synthetic_rejects_bad_arguments(arguments):
    with pytest.raises(ValueError, match="generate_synthetic"):
        generate_synthetic(**arguments)


# ---------------------------------------------------------------- load_interactions


def data_cfg(name, root, **options):
    return SimpleNamespace(name=name, root=None if root is None else str(root), **options)


REAL_DATASETS = [
    ("ml-1m", 6040, 3706, 1_000_209),
    ("ml-100k", 943, 1682, 100_000),
    ("amazon-beauty", 22_363, 12_101, 198_502),
    ("amazon-toys", 19_412, 11_924, 167_597),
]


@pytest.mark.parametrize("name, users, items, interactions", REAL_DATASETS)
def test_load_real_dataset(name, users, items, interactions):
    source = download_module.DATASETS[name]
    if not any(
        (SHARED_DATA / file.path).is_file() for file in (*source.preferred, source.official)
    ):
        pytest.skip(
            f"{name} is not in {SHARED_DATA}; set GENREC_SHARED_DATA to the shared data folder"
        )
    cfg = OmegaConf.create(
        {"name": name, "root": str(SHARED_DATA), "download": False, "min_rating": None}
    )
    data = load_interactions(cfg)
    assert (data.num_users, data.num_items, data.num_interactions) == (users, items, interactions)
    assert len(data.raw_item_ids) == items + 1
    splits = leave_one_out(data, max_len=200)
    assert splits.test.history.shape == (users, 200)
    lengths = np.array([len(sequence) for sequence in data.sequences])
    assert splits.test.lengths.tolist() == np.minimum(lengths - 1, 200).tolist()
    assert splits.test.target.tolist() == [int(sequence[-1]) for sequence in data.sequences]


def test_load_ml1m_prefers_sequences_unless_ratings_are_filtered(tmp_path):
    write(tmp_path, "ml-1m/sequences.txt", "1 10 20 30\n")
    write(tmp_path, "ml-1m/ratings.dat", "1::10::5::3\n1::20::1::2\n1::30::4::1\n")
    assert load_interactions(data_cfg("ml-1m", tmp_path)).timestamps is None
    filtered = load_interactions(data_cfg("ml-1m", tmp_path, min_rating=4))
    assert filtered.raw_item_ids[filtered.sequences[0]].tolist() == [30, 10]


def test_load_uses_env_root(tmp_path, monkeypatch):
    write(tmp_path, "ml-100k/u.data", U_DATA)
    monkeypatch.setenv("GENREC_DATA_ROOT", str(tmp_path))
    data = load_interactions(data_cfg("ml-100k", None, download=False))
    assert data.raw_user_ids.tolist() == [186, 196]
    assert data.raw_item_ids[data.sequences[1]].tolist() == [377, 242]


def test_load_synthetic_from_config():
    cfg = OmegaConf.create(
        {"name": "synthetic", "root": None, "synthetic": {"num_users": 50, "seed": 7}}
    )
    data = load_interactions(cfg)
    expected = generate_synthetic(num_users=50, seed=7)
    assert same_arrays(data.sequences, expected.sequences)
    with pytest.raises(ValueError, match=r"unknown synthetic option.*num_user\b"):
        load_interactions(OmegaConf.create({"name": "synthetic", "synthetic": {"num_user": 5}}))


def test_load_missing_dataset_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_interactions(data_cfg("ml-100k", tmp_path, download=False))
    message = str(error.value)
    assert str(tmp_path / "ml-100k" / "u.data") in message
    assert "https://files.grouplens.org/datasets/movielens/ml-100k.zip" in message
    assert "download: true" in message


def test_load_ratings_filter_needs_ratings_dat(tmp_path):
    write(tmp_path, "ml-1m/sequences.txt", "1 10 20 30\n")
    with pytest.raises(DatasetNotFoundError, match=r"ratings\.dat"):
        load_interactions(data_cfg("ml-1m", tmp_path, download=False, min_rating=4))
    with pytest.raises(ValueError, match="has no ratings"):
        load_interactions(data_cfg("amazon-beauty", tmp_path, download=False, min_rating=4))


def test_load_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset 'ml-20m'") as error:
        load_interactions(data_cfg("ml-20m", None))
    assert all(name in str(error.value) for name in DATASET_NAMES)


# ---------------------------------------------------------------- downloads (file:// URLs only)


def serve_zip(tmp_path, monkeypatch, digest=None) -> Path:
    """Points ml-100k at a local zip shaped like the official one; returns the data root."""
    archive = tmp_path / "remote" / "ml-100k.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ml-100k/README", "readme")
        zipped.writestr("ml-100k/u.data", U_DATA)
    digest = digest or hashlib.md5(archive.read_bytes()).hexdigest()
    source = dataclasses.replace(
        download_module.DATASETS["ml-100k"], url=archive.as_uri(), digest=digest
    )
    monkeypatch.setitem(download_module.DATASETS, "ml-100k", source)
    return tmp_path / "data"


def leftovers(root: Path) -> list[str]:
    return (
        sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
        if root.exists()
        else []
    )


def test_download_checks_and_unpacks_archive(tmp_path, monkeypatch):
    root = serve_zip(tmp_path, monkeypatch)
    data = load_interactions(data_cfg("ml-100k", root, download=True))
    assert data.num_interactions == 3
    assert leftovers(root) == ["ml-100k.zip", "ml-100k/u.data"]
    (root / "ml-100k" / "u.data").unlink()
    (tmp_path / "remote" / "ml-100k.zip").unlink()  # unpacking again needs only the kept archive
    assert load_interactions(data_cfg("ml-100k", root)).num_interactions == 3


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    root = serve_zip(tmp_path, monkeypatch, digest="0" * 32)
    actual = hashlib.md5((tmp_path / "remote" / "ml-100k.zip").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=f"expected {'0' * 32}, got {actual}"):
        load_interactions(data_cfg("ml-100k", root))
    assert leftovers(root) == []


def test_corrupt_kept_archive_is_reported(tmp_path, monkeypatch):
    root = serve_zip(tmp_path, monkeypatch)
    write(root, "ml-100k.zip", "not a zip")
    with pytest.raises(DataError, match=r"checksum mismatch.*delete it"):
        load_interactions(data_cfg("ml-100k", root))


def test_download_plain_file(tmp_path, monkeypatch):
    remote = write(tmp_path, "remote/Beauty.txt", "1 1 2 3\n2 2 3\n")
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    source = dataclasses.replace(
        download_module.DATASETS["amazon-beauty"], url=remote.as_uri(), digest=digest
    )
    monkeypatch.setitem(download_module.DATASETS, "amazon-beauty", source)
    data = load_interactions(data_cfg("amazon-beauty", tmp_path / "data"))
    assert data.num_users == 2 and data.num_items == 3
    assert leftovers(tmp_path / "data") == ["amazon-5core/Beauty.txt"]


def test_download_failure_is_dataset_not_found(tmp_path, monkeypatch):
    unreachable = (tmp_path / "nowhere" / "ml-100k.zip").as_uri()
    source = dataclasses.replace(download_module.DATASETS["ml-100k"], url=unreachable)
    monkeypatch.setitem(download_module.DATASETS, "ml-100k", source)
    with pytest.raises(DatasetNotFoundError, match="the download failed") as error:
        load_interactions(data_cfg("ml-100k", tmp_path / "data"))
    assert str(tmp_path / "data" / "ml-100k" / "u.data") in str(error.value)
    assert leftovers(tmp_path / "data") == []
