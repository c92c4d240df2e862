"""data=interactions: a user's own CSV/TSV/Parquet log read through pyarrow, its filters, its report, and every
kind of bad data with its exact message. Real files in tmp_path."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from conftest import run_pipeline
from pipeline.data import DataError
from pipeline.data.interactions import TableSpec, read_interactions
from pipeline.data.vocabulary import VOCABULARY_FILE, read_vocabulary
from pipeline.integrity import IntegrityError

HEADER = "user_id,item_id,timestamp\n"
# u1's actions in file order: b@5, a@3, c@5 (tie with b: b first), d@2020-01-01 as ISO-8601.
LOG = HEADER + "u1,b,5\nu1,a,3\nu2,a,1\nu1,c,5\nu2,b,2\nu2,c,3\nu1,d,2020-01-01T00:00:00Z\n"


def write(tmp_path: Path, text: str | bytes, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def read(path: Path, **options) -> object:
    filters = {k: options.pop(k) for k in ("drop_duplicates", "min_user_interactions", "min_item_interactions")
               if k in options}
    return read_interactions(TableSpec(path=str(path), **options), "log", **filters)


def raw_sequences(interactions) -> dict:
    return {user: interactions.raw_item_ids[seq].tolist()
            for user, seq in zip(interactions.raw_user_ids.tolist(), interactions.sequences)}


def test_csv_with_string_ids_orders_by_time_ties_in_file_order(tmp_path):
    data = read(write(tmp_path, LOG))
    assert raw_sequences(data) == {"u1": ["a", "b", "c", "d"], "u2": ["a", "b", "c"]}
    assert [t.tolist() for t in data.timestamps] == [[3, 5, 5, 1577836800], [1, 2, 3]]
    assert data.raw_item_ids.tolist() == [None, "a", "b", "c", "d"]  # model ids by ascending raw id
    assert [s.tolist() for s in data.sequences] == [[1, 2, 3, 4], [1, 2, 3]]
    assert data.report == {"rows_read": 7, "bad_rows_skipped": 0, "duplicates_dropped": 0, "kcore_rows_dropped": 0,
                           "kcore_rounds": 0, "short_users_dropped": 0, "short_user_rows_dropped": 0, "users": 2,
                           "items": 4, "interactions": 7}


def test_tsv_and_parquet_read_the_same_as_csv(tmp_path):
    csv = read(write(tmp_path, LOG))
    tsv = read(write(tmp_path, LOG.replace(",", "\t"), "log.tsv"))
    table = pa.table({"user_id": ["u1", "u1", "u2", "u1", "u2", "u2", "u1"], "item_id": list("baacbcd"),
                      "timestamp": [5, 3, 1, 5, 2, 3, 1577836800]})
    pq.write_table(table, tmp_path / "log.parquet", row_group_size=3)
    parquet = read(tmp_path / "log.parquet")
    for other in (tsv, parquet):
        assert raw_sequences(other) == raw_sequences(csv)
        assert [t.tolist() for t in other.timestamps] == [t.tolist() for t in csv.timestamps]


def test_format_option_overrides_the_extension(tmp_path):
    path = write(tmp_path, LOG.replace(",", "\t"), "log.txt")
    with pytest.raises(DataError) as error:
        read(path)
    assert str(error.value) == (f"{path}: cannot tell the format from the extension .txt; name the file .csv, .tsv "
                                "or .parquet, or set data.format to one of csv, tsv, parquet")
    assert raw_sequences(read(path, format="tsv"))["u1"] == ["a", "b", "c", "d"]


def test_renamed_columns_integer_ids_and_no_timestamp(tmp_path):
    path = write(tmp_path, "who,what,extra\n20,300,x\n10,100,y\n20,100,z\n10,300,w\n20,200,v\n10,200,u\n")
    data = read(path, user="who", item="what", timestamp=None)
    assert data.timestamps is None
    assert data.raw_user_ids.tolist() == [10, 20] and data.raw_item_ids.tolist() == [-1, 100, 200, 300]
    assert raw_sequences(data) == {10: [100, 300, 200], 20: [300, 100, 200]}  # file order


def test_headerless_file_with_column_names(tmp_path):
    path = write(tmp_path, "1\t7\t5\t20\n1\t8\t5\t10\n1\t9\t5\t30\n", "u.tsv")
    data = read(path, header=False, column_names=("u", "i", "r", "t"), user="u", item="i", timestamp="t")
    assert raw_sequences(data) == {1: [8, 7, 9]}


def test_drop_duplicates_keeps_the_first(tmp_path):
    path = write(tmp_path, HEADER + "u,a,1\nu,b,2\nu,a,1\nu,a,3\nu,c,4\n")
    assert raw_sequences(read(path)) == {"u": ["a", "a", "b", "a", "c"]}
    data = read(path, drop_duplicates=True)
    assert raw_sequences(data) == {"u": ["a", "b", "a", "c"]}  # the same item at another time is no duplicate
    assert data.report["duplicates_dropped"] == 1
    # Equal times: the duplicate need not follow its twin; the tie keeps file order (b before the first a).
    path = write(tmp_path, HEADER + "u,b,1\nu,a,1\nu,c,1\nu,a,1\nu,b,0\n")
    assert raw_sequences(read(path, drop_duplicates=True)) == {"u": ["b", "b", "a", "c"]}
    path = write(tmp_path, "user_id,item_id\nu,b\nu,a\nu,b\nu,c\n")
    assert raw_sequences(read(path, timestamp=None, drop_duplicates=True)) == {"u": ["b", "a", "c"]}


def test_k_core_iterates_to_a_fixpoint(tmp_path):
    # min 2 per item, 3 per user. Item z has one row: it goes, which leaves v with 2 rows, so v goes, which
    # leaves item y with 1 row, so y goes in the third round; u and w keep 3 rows each on items a, b, c.
    rows = ["u,a,1", "u,b,2", "u,c,3", "w,a,1", "w,b,2", "w,c,3", "v,a,1", "v,y,2", "v,z,3", "x,y,1", "x,a,2",
            "x,b,3", "x,c,4"]
    data = read(write(tmp_path, HEADER + "\n".join(rows) + "\n"), min_user_interactions=3, min_item_interactions=2)
    assert raw_sequences(data) == {"u": ["a", "b", "c"], "w": ["a", "b", "c"], "x": ["a", "b", "c"]}
    assert data.report["kcore_rows_dropped"] == 4 and data.report["kcore_rounds"] == 4


def test_users_with_fewer_than_three_actions_are_dropped_and_counted(tmp_path):
    data = read(write(tmp_path, HEADER + "a,1,1\na,2,2\na,3,3\nb,1,1\nb,2,2\nc,3,1\n"))
    assert raw_sequences(data) == {"a": [1, 2, 3]}
    assert data.report["short_users_dropped"] == 2 and data.report["short_user_rows_dropped"] == 3


def test_nothing_left_after_the_filters(tmp_path):
    with pytest.raises(DataError, match=r"^log: no user is left with 3 actions after the filters \(rows_read=2,"):
        read(write(tmp_path, HEADER + "a,1,1\na,2,2\n"))


# ---------------------------------------------------------------- bad data: one exact message each


def fails(path: Path, **options) -> str:
    with pytest.raises(DataError) as error:
        read(path, **options)
    return str(error.value)


SKIP_HINT = "; fix the row, or set data.on_bad_rows=skip to drop such rows"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    assert fails(path) == f"{path}: no such file; set data.path to your interaction log (CSV, TSV or Parquet)"


def test_empty_file(tmp_path):
    path = write(tmp_path, "")
    assert fails(path) == f"{path}: the file is empty"


def test_header_only(tmp_path):
    path = write(tmp_path, HEADER)
    assert fails(path) == f"{path}: no rows after the header"


def test_missing_column_names_the_columns_present(tmp_path):
    path = write(tmp_path, "user,item_id,time\nu,a,1\n")
    assert fails(path) == f"{path}: no column 'user_id' (data.columns.user); the columns are: 'user', 'item_id', 'time'"
    assert fails(path, user="user") == (
        f"{path}: no column 'timestamp' (data.columns.timestamp); the columns are: 'user', 'item_id', 'time'")


def test_wrong_number_of_fields(tmp_path):
    path = write(tmp_path, HEADER + "u,a,1\nu,b\nu,c,3\n")
    assert fails(path) == f"{path}:3: expected 3 fields separated by ',', found 2: 'u,b'"


def test_unparseable_timestamp(tmp_path):
    path = write(tmp_path, HEADER + "u,a,1\nu,b,2\nu,c,yesterday\nu,d,4\n")
    assert fails(path) == (f"{path}:4: timestamp 'yesterday' (column 'timestamp') is neither integer epoch seconds "
                           f"nor an ISO-8601 date-time{SKIP_HINT}")


def test_empty_id_and_empty_line(tmp_path):
    path = write(tmp_path, HEADER + "u,a,1\n,b,2\n")
    assert fails(path) == f"{path}:3: the user id (column 'user_id') is empty{SKIP_HINT}"
    path = write(tmp_path, HEADER + "u,a,1\n\nu,b,2\n")
    assert fails(path) == f"{path}:3: empty line{SKIP_HINT}"


def test_non_utf8_bytes(tmp_path):
    path = write(tmp_path, (HEADER + "u,a,1\nu,b,2\n").encode() + b"u,caf\xe9,3\n")
    assert fails(path) == f"{path}:4: column 'item_id' is not UTF-8 text: b'caf\\xe9'{SKIP_HINT}"
    path = write(tmp_path, b"user_id,it\xe9m,timestamp\nu,a,1\n")
    assert fails(path) == f"{path}:1: the header is not UTF-8 text (byte 0xe9 at offset 10)"


def test_non_utf8_bytes_after_the_first_block(tmp_path):
    # The reader infers types from its first block; bytes that are not UTF-8 further on are found too.
    rows = "".join(f"u{i % 50},i{i % 70},{i}\n" for i in range(400_000))  # > 4 MiB... and the block is 16 MiB
    rows = rows * 5
    path = write(tmp_path, HEADER.encode() + rows.encode() + b"u1,\xff,7\n")
    assert fails(path) == f"{path}:2000002: column 'item_id' is not UTF-8 text: b'\\xff'{SKIP_HINT}"


def test_parquet_bad_timestamp_names_the_row_group(tmp_path):
    table = pa.table({"user_id": [1, 1, 1, 1, 1], "item_id": [1, 2, 3, 4, 5],
                      "timestamp": ["1", "2", "3", "2020-02-30", "5"]})
    pq.write_table(table, tmp_path / "log.parquet", row_group_size=2)
    path = tmp_path / "log.parquet"
    assert fails(path) == (f"{path}: row group 1, row 1: timestamp '2020-02-30' (column 'timestamp') is neither "
                           f"integer epoch seconds nor an ISO-8601 date-time{SKIP_HINT}")


def test_parquet_missing_column_and_not_parquet(tmp_path):
    pq.write_table(pa.table({"u": [1], "item_id": [1]}), tmp_path / "log.parquet")
    path = tmp_path / "log.parquet"
    assert fails(path) == f"{path}: no column 'user_id' (data.columns.user); the columns are: 'u', 'item_id'"
    path = write(tmp_path, LOG, "fake.parquet")
    assert fails(path).startswith(f"{path}: not a Parquet file (")


def test_on_bad_rows_skip_drops_and_counts(tmp_path):
    good = "u,a,1\nu,b,2\nu,c,3\n"
    path = write(tmp_path, (HEADER + good + "u,x\n,b,2\nu,d,never\n\n").encode() + b"u,\xff,9\n")
    data = read(path, on_bad_rows="skip")
    assert raw_sequences(data) == {"u": ["a", "b", "c"]}
    assert data.report["bad_rows_skipped"] == 5 and data.report["rows_read"] == 8


def test_bad_option_values(tmp_path):
    path = write(tmp_path, LOG)
    assert fails(path, on_bad_rows="ignore") == "unknown data.on_bad_rows 'ignore'; valid: error, skip"
    assert fails(path, min_user_interactions=0) == "data.min_user_interactions must be an integer >= 1, got 0"


# ---------------------------------------------------------------- the train stage


def test_train_on_a_log_saves_the_vocabulary_and_logs_the_report(tmp_path):
    rng = np.random.default_rng(0)
    lines = [HEADER.strip()]
    for user in range(40):
        for step, item in enumerate(rng.choice(120, size=8, replace=False)):
            lines.append(f"user-{user},item-{item},{1_600_000_000 + 60 * step}")
    lines.append(lines[1])  # an exact duplicate
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    artifacts = tmp_path / "artifacts"
    args = ["stage=train", "data=interactions", "data.path=log.csv", "data.drop_duplicates=true", "model.max_len=8",
            "model.dim=16", "train.epochs=1", "train.batch_size=64", "train.num_negatives=8",
            f"artifacts_dir={artifacts}"]
    result = run_pipeline(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("genrec")
    train = next(r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "train")
    metrics = train.data.metrics
    assert metrics["data_rows_read"] == 321 and metrics["data_duplicates_dropped"] == 1
    assert metrics["data_users"] == 40 and metrics["data_interactions"] == 320
    digest = train.data.params["data_source_sha256"]
    inputs = train.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("log.csv", digest[:16])]
    vocabulary_path = Path(next(artifacts.glob("runs/*/" + VOCABULARY_FILE)))
    vocabulary = read_vocabulary(vocabulary_path)
    assert vocabulary["users"] == sorted(f"user-{u}" for u in range(40))
    assert vocabulary["items"] == sorted({line.split(",")[1] for line in lines[1:]})
    manifest = json.loads(next(artifacts.glob("runs/*/manifest.json")).read_text())
    assert json.dumps(manifest).count(str(vocabulary_path)) == 1
    vocabulary_path.write_text(vocabulary_path.read_text().replace("item-1", "item-X"))
    with pytest.raises(IntegrityError):
        read_vocabulary(vocabulary_path)


# ---------------------------------------------------------------- the public datasets as presets


def test_grouplens_presets_read_through_the_log_reader_as_before(tmp_path):
    from conftest import shared_data
    from pipeline.data import interactions_from_ratings, read_grouplens_ratings
    from pipeline.data.download import _read, DATASETS

    u_data = shared_data() / "ml-100k" / "u.data"
    if not u_data.is_file():
        pytest.skip(f"{u_data} is not here; set GENREC_SHARED_DATA to the shared data folder")
    text = "".join(line.replace("\t", "::") for line in u_data.read_text().splitlines(keepends=True)[:20_000])
    ratings_dat = write(tmp_path, text, "ratings.dat")
    for file, path in ((DATASETS["ml-100k"].official, u_data), (DATASETS["ml-1m"].official, ratings_dat)):
        for min_rating in (None, 4):
            new = _read("x", file, path, min_rating)
            old = interactions_from_ratings("x", *read_grouplens_ratings(path, file.sep), min_rating=min_rating)
            assert new.raw_user_ids.tolist() == old.raw_user_ids.tolist()
            assert new.raw_item_ids.tolist() == old.raw_item_ids.tolist()
            assert [s.tolist() for s in new.sequences] == [s.tolist() for s in old.sequences]
            assert [t.tolist() for t in new.timestamps] == [t.tolist() for t in old.timestamps]


def test_grouplens_preset_bad_line(tmp_path):
    from pipeline.data.download import _read, DATASETS

    path = write(tmp_path, "1::10::5::3\n1::20::1\n", "ratings.dat")
    with pytest.raises(DataError) as error:
        _read("ml-1m", DATASETS["ml-1m"].official, path, None)
    assert str(error.value) == f"{path}:2: expected 7 fields separated by ':', found 5: '1::20::1'"


@pytest.mark.slow
def test_promote_refuses_a_log_that_no_longer_gives_the_trained_vocabulary(tmp_path):
    rng = np.random.default_rng(3)
    lines = [HEADER.strip()] + [f"u{user},i{item},{step}" for user in range(40)
                                for step, item in enumerate(rng.choice(120, size=6, replace=False))]
    log = tmp_path / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    args = ["data=interactions", "data.path=log.csv", "model.max_len=8", "model.dim=16", "train.epochs=1",
            "train.num_negatives=8", "validate.batch_sizes=[1]", "validate.warmup=1", "validate.iters=2",
            "validate.top_k=20", "precision=fp32", f"artifacts_dir={tmp_path / 'artifacts'}"]
    result = run_pipeline([*args, "stage=[train,validate]"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    renamed = sorted({line.split(",")[1] for line in lines[1:]})[0]
    log.write_text(log.read_text().replace(f",{renamed},", ",zzz,"))
    result = run_pipeline([*args, "stage=promote"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no longer gives the vocabulary the model was trained with" in output, output
