"""data.generic and data.load: a team's own CSV or Parquet log with a mapping."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pydantic
import pytest

from data.features import is_missing
from data.generic import ColumnMapping, MappingError, load_generic
from data.load import load_data
from data.schema import DataLayoutError


def epoch(text: str) -> int:
    """ISO text as UTC epoch seconds, computed without pandas."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


# A rating log: string cells, as a CSV holds them. `when` mixes ISO datetimes
# (with and without a zone) and epoch seconds.
RATED = {
    "uid": ["1", "2", "1", "3", "2"],
    "iid": ["10", "10", "20", "30", "40"],
    "stars": ["5", "3", "4", "1", "4.5"],
    "when": [
        "2021-01-01T00:00:00",
        "2021-01-02T06:30:00",
        "2021-01-03T12:00:00+02:00",
        "2021-01-04",
        "1609459200",
    ],
    "country": ["fr", "de", "fr", "us", "de"],
    "genre": ["drama", "comedy", "drama", "horror", "comedy"],
    "name": ["Ten", "Ten", "Twenty", "Thirty", "Forty"],
}
RATED_MAPPING = ColumnMapping(
    user="uid",
    item="iid",
    timestamp="when",
    rating="stars",
    user_features=["country"],
    item_features=["genre"],
    title="name",
)
CLICKED = {
    "user_id": ["7", "7", "8"],
    "item_id": ["1", "2", "1"],
    "clicked": ["1", "0", "1"],
    "timestamp": ["100", "200", "300"],
}
CLICK_MAPPING = ColumnMapping(click="clicked")


def write_csv(path: Path, columns: dict[str, list]) -> Path:
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


def typed_parquet(path: Path) -> Path:
    """RATED with real column types: integer ids, float ratings, datetimes."""
    frame = pd.DataFrame(
        {
            "uid": [int(u) for u in RATED["uid"]],
            "iid": [int(i) for i in RATED["iid"]],
            "stars": [float(r) for r in RATED["stars"]],
            "when": pd.to_datetime(
                [datetime.fromtimestamp(epoch(t), UTC) for t in RATED["when"][:4]]
                + [datetime.fromtimestamp(1609459200, UTC)]
            ),
            "country": RATED["country"],
            "genre": RATED["genre"],
            "name": RATED["name"],
        }
    )
    frame.to_parquet(path)
    return path


def test_csv_rating_log_loads(tmp_path: Path) -> None:
    loaded = load_generic(write_csv(tmp_path / "log.csv", RATED), RATED_MAPPING)

    frame = loaded.interactions
    assert frame.user_id.tolist() == [1, 2, 1, 3, 2]
    assert frame.item_id.tolist() == [10, 10, 20, 30, 40]
    assert frame.rating.tolist() == [5.0, 3.0, 4.0, 1.0, 4.5]
    assert frame.click.tolist() == [1, 0, 1, 0, 1], "click is rating >= 4"
    expected = [epoch(t) for t in RATED["when"][:4]] + [1609459200]
    assert frame.timestamp.tolist() == expected
    assert str(frame.timestamp.dtype) == "int64"
    assert (loaded.rows_in, loaded.rows_kept, loaded.rows_quarantined) == (5, 5, 0)
    assert loaded.user_features == {"country": "categorical"}
    assert loaded.item_features == ["genre"]


def test_side_features_and_titles_are_tables(tmp_path: Path) -> None:
    loaded = load_generic(write_csv(tmp_path / "log.csv", RATED), RATED_MAPPING)
    users = loaded.users.set_index("user_id")
    assert sorted(users.index) == [1, 2, 3]
    assert users.country.to_dict() == {1: "fr", 2: "de", 3: "us"}
    items = loaded.items.set_index("item_id")
    assert sorted(items.index) == [10, 20, 30, 40]
    assert items.genre.to_dict() == {
        10: ["comedy"],  # the later of its two rows
        20: ["drama"],
        30: ["horror"],
        40: ["comedy"],
    }
    assert items.title.to_dict() == {10: "Ten", 20: "Twenty", 30: "Thirty", 40: "Forty"}


def test_latest_side_feature_value_wins_by_timestamp(tmp_path: Path) -> None:
    # The log is not in time order: the newer value comes first in the file.
    columns = {
        "user_id": ["1", "1", "2"],
        "item_id": ["5", "6", "5"],
        "clicked": ["1", "0", "1"],
        "timestamp": ["200", "100", "150"],
        "plan": ["premium", "free", "free"],
        "shelf": ["new", "old", "old"],
    }
    mapping = ColumnMapping(
        click="clicked", user_features=["plan"], item_features=["shelf"]
    )
    loaded = load_generic(write_csv(tmp_path / "log.csv", columns), mapping)
    assert loaded.users.set_index("user_id").plan.to_dict() == {
        1: "premium",
        2: "free",
    }
    # Item 5 was "new" at t=200, its latest row, though an earlier line of the file.
    assert loaded.items.set_index("item_id").shelf.to_dict() == {
        5: ["new"],
        6: ["old"],
    }


def test_a_later_empty_cell_does_not_erase_a_known_value(tmp_path: Path) -> None:
    columns = {
        "user_id": ["1", "1", "2", "2"],
        "item_id": ["5", "6", "5", "6"],
        "clicked": ["1", "0", "1", "0"],
        "timestamp": ["100", "200", "300", "400"],
        "plan": ["premium", "", "", ""],
        "shelf": ["new", "old", "", ""],
        "name": ["Five", "Six", "", "Six again"],
    }
    mapping = ColumnMapping(
        click="clicked", user_features=["plan"], item_features=["shelf"], title="name"
    )
    loaded = load_generic(write_csv(tmp_path / "log.csv", columns), mapping)
    users = loaded.users.set_index("user_id").plan
    assert users[1] == "premium", "its t=200 row left the plan empty"
    assert is_missing(users[2]), "never given: unknown"
    items = loaded.items.set_index("item_id")
    assert items.shelf.to_dict() == {5: ["new"], 6: ["old"]}
    assert items.title.to_dict() == {5: "Five", 6: "Six again"}


def test_items_without_a_title_column_get_a_name(tmp_path: Path) -> None:
    loaded = load_generic(write_csv(tmp_path / "log.csv", CLICKED), CLICK_MAPPING)
    assert loaded.items.set_index("item_id").title.to_dict() == {
        1: "item 1",
        2: "item 2",
    }


def test_parquet_log_loads_like_the_csv(tmp_path: Path) -> None:
    from_csv = load_generic(write_csv(tmp_path / "log.csv", RATED), RATED_MAPPING)
    from_parquet = load_generic(typed_parquet(tmp_path / "log.parquet"), RATED_MAPPING)
    pd.testing.assert_frame_equal(from_parquet.interactions, from_csv.interactions)
    pd.testing.assert_frame_equal(from_parquet.users, from_csv.users)
    pd.testing.assert_frame_equal(from_parquet.items, from_csv.items)
    assert from_parquet.rows_in == from_csv.rows_in == 5


def test_parquet_of_strings_loads_like_the_csv(tmp_path: Path) -> None:
    pd.DataFrame(RATED).to_parquet(tmp_path / "log.parquet")
    from_csv = load_generic(write_csv(tmp_path / "log.csv", RATED), RATED_MAPPING)
    from_parquet = load_generic(tmp_path / "log.parquet", RATED_MAPPING)
    pd.testing.assert_frame_equal(from_parquet.interactions, from_csv.interactions)


def test_tsv_log_loads_like_the_csv(tmp_path: Path) -> None:
    pd.DataFrame(RATED).to_csv(tmp_path / "log.tsv", sep="\t", index=False)
    from_csv = load_generic(write_csv(tmp_path / "log.csv", RATED), RATED_MAPPING)
    from_tsv = load_generic(tmp_path / "log.tsv", RATED_MAPPING)
    pd.testing.assert_frame_equal(from_tsv.interactions, from_csv.interactions)


def test_click_log_has_nan_ratings(tmp_path: Path) -> None:
    loaded = load_generic(write_csv(tmp_path / "log.csv", CLICKED), CLICK_MAPPING)
    frame = loaded.interactions
    assert frame.click.tolist() == [1, 0, 1]
    assert all(math.isnan(r) for r in frame.rating)
    assert frame.timestamp.tolist() == [100, 200, 300]


@pytest.mark.parametrize(
    ("column", "value", "reason_part"),
    [
        ("uid", "abc", "uid 'abc' is not a non-negative integer"),
        ("uid", "1.5", "uid '1.5' is not a non-negative integer"),
        ("uid", "-4", "uid '-4' is not a non-negative integer"),
        ("uid", "inf", "uid 'inf' is not a non-negative integer"),
        ("uid", "", "uid '' is not a non-negative integer"),
        ("iid", "x10", "iid 'x10' is not a non-negative integer"),
        ("when", "yesterday", "when 'yesterday' is neither epoch seconds nor"),
        ("when", "2021-13-45", "when '2021-13-45' is neither"),
        ("when", "inf", "when 'inf' is neither"),
        ("when", "", "when '' is neither"),
        ("when", "now", "when 'now' is neither"),
        ("when", "today", "when 'today' is neither"),
        ("when", "99999999999999999999", "when '99999999999999999999' is neither"),
        ("when", "-5", "when '-5' is before 1970"),
        ("when", "1969-12-31", "when '1969-12-31' is before 1970"),
        ("uid", "99999999999999999999", "is not a non-negative integer"),
        ("stars", "6", "stars '6' is not a number from 1 to 5"),
        ("stars", "0", "stars '0' is not a number from 1 to 5"),
        ("stars", "five", "stars 'five' is not a number from 1 to 5"),
        ("stars", "nan", "stars 'nan' is not a number from 1 to 5"),
    ],
)
def test_bad_rating_log_row_is_quarantined_with_its_csv_line(
    tmp_path: Path, column: str, value: str, reason_part: str
) -> None:
    columns = {name: list(values) for name, values in RATED.items()}
    columns[column][2] = value  # the third data row: line 4 after the header
    loaded = load_generic(write_csv(tmp_path / "log.csv", columns), RATED_MAPPING)

    assert len(loaded.quarantine) == 1, loaded.quarantine.to_string()
    row = loaded.quarantine.iloc[0]
    assert row.source == "log.csv"
    assert row.line == 4, "line 1 is the header"
    assert reason_part in row.reason
    assert json.loads(row.raw)[column] == value
    assert (loaded.rows_in, loaded.rows_kept, loaded.rows_quarantined) == (5, 4, 1)
    assert 20 not in set(loaded.items.item_id), "a refused row adds no item"


@pytest.mark.parametrize("value", ["2", "-1", "yes", "0.5", "inf"])
def test_click_that_is_not_0_or_1_is_quarantined(tmp_path: Path, value: str) -> None:
    columns = {name: list(values) for name, values in CLICKED.items()}
    columns["clicked"][1] = value
    loaded = load_generic(write_csv(tmp_path / "log.csv", columns), CLICK_MAPPING)
    assert loaded.quarantine.line.tolist() == [3]
    assert f"clicked {value!r} is not 0 or 1" in loaded.quarantine.reason.iloc[0]
    assert loaded.interactions.item_id.tolist() == [1, 1]


def test_duplicate_row_is_quarantined(tmp_path: Path) -> None:
    columns = {name: [*values, values[0]] for name, values in CLICKED.items()}
    columns["clicked"][-1] = "0"  # same user, item and time: still a duplicate
    loaded = load_generic(write_csv(tmp_path / "log.csv", columns), CLICK_MAPPING)
    assert loaded.quarantine.line.tolist() == [5]
    assert loaded.quarantine.reason.iloc[0] == (
        "duplicate of line 2 (same user, item and timestamp; its label differs, "
        "the first is kept)"
    )
    assert loaded.interactions.click.tolist() == [1, 0, 1], "the first one is kept"
    assert loaded.rows_in == loaded.rows_kept + loaded.rows_quarantined == 4


def test_epoch_timestamps_in_finer_units_read_as_seconds(tmp_path: Path) -> None:
    seconds = 1_600_000_000
    spellings = [
        str(seconds),
        f"{seconds}.7",  # a fraction is dropped
        str(seconds * 1000 + 250),  # milliseconds
        str(seconds * 10**6),  # microseconds
        str(seconds * 10**9 + 999_999_999),  # nanoseconds, exactly
        "1.6e9",
    ]
    columns = {
        "uid": ["1"] * len(spellings),
        "iid": [str(i) for i in range(1, len(spellings) + 1)],
        "when": spellings,
        "stars": ["4"] * len(spellings),
    }
    loaded = load_generic(write_csv(tmp_path / "log.csv", columns), PLAIN_MAPPING)
    assert loaded.rows_quarantined == 0
    assert loaded.interactions.timestamp.tolist() == [seconds] * len(spellings)


def test_duplicate_is_found_across_id_and_timestamp_spellings(tmp_path: Path) -> None:
    columns = {
        "user_id": ["7", "7.0"],
        "item_id": ["1", "1"],
        "clicked": ["1", "1"],
        "timestamp": ["1609459200", "2021-01-01T00:00:00Z"],
    }
    loaded = load_generic(write_csv(tmp_path / "log.csv", columns), CLICK_MAPPING)
    assert loaded.rows_kept == 1
    assert loaded.quarantine.line.tolist() == [3]


def test_parquet_bad_row_is_numbered_from_1(tmp_path: Path) -> None:
    columns = {name: list(values) for name, values in CLICKED.items()}
    columns["clicked"][1] = "7"
    pd.DataFrame(columns).to_parquet(tmp_path / "log.parquet")
    loaded = load_generic(tmp_path / "log.parquet", CLICK_MAPPING)
    assert loaded.quarantine.source.tolist() == ["log.parquet"]
    assert loaded.quarantine.line.tolist() == [2]


def test_mapping_naming_a_missing_column_says_which_field_and_the_fix(
    tmp_path: Path,
) -> None:
    mapping = RATED_MAPPING.model_copy(
        update={"user_features": ["country", "age"], "timestamp": "ts"}
    )
    with pytest.raises(MappingError) as caught:
        load_generic(write_csv(tmp_path / "log.csv", RATED), mapping)
    lines = str(caught.value).splitlines()
    columns = ", ".join(RATED)
    assert lines == [
        f"the mapping: field 'timestamp': column 'ts' is not in log.csv "
        f"(columns: {columns}); set it to one of them",
        f"the mapping: field 'user_features': column 'age' is not in log.csv "
        f"(columns: {columns}); remove it or set it to one of them",
    ], "one line per wrong column; present ones ('country') are not named"


def test_missing_column_error_names_the_mapping_file(tmp_path: Path) -> None:
    log = write_csv(tmp_path / "events.csv", RATED)
    mapping_file = tmp_path / "mapping.yaml"
    mapping_file.write_text("user: uid\nitem: iid\ntimestamp: when\nrating: score\n")
    with pytest.raises(MappingError, match="field 'rating': column 'score'") as caught:
        load_data(log, mapping_file)
    assert str(caught.value).startswith(f"{mapping_file}: field 'rating'")
    assert f"is not in events.csv (columns: {', '.join(RATED)});" in str(caught.value)


def test_unknown_file_type_is_a_layout_error(tmp_path: Path) -> None:
    (tmp_path / "log.txt").write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataLayoutError, match=r"log\.txt.*'\.txt'"):
        load_generic(tmp_path / "log.txt", CLICK_MAPPING)


@pytest.mark.parametrize(
    "labels", [{}, {"rating": "stars", "click": "clicked"}], ids=["neither", "both"]
)
def test_mapping_needs_exactly_one_label(labels: dict) -> None:
    with pytest.raises(pydantic.ValidationError, match="exactly one label column"):
        ColumnMapping(**labels)


def test_load_data_refuses_a_log_file_without_a_mapping(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", CLICKED)
    with pytest.raises(ValueError, match="--mapping") as caught:
        load_data(path)
    assert "log.csv" in str(caught.value)


def test_load_data_reads_a_mapping_file(tmp_path: Path) -> None:
    log = write_csv(tmp_path / "log.csv", RATED)
    mapping_file = tmp_path / "mapping.json"
    mapping_file.write_text(RATED_MAPPING.model_dump_json())
    loaded = load_data(log, mapping_file)
    expected = load_generic(log, RATED_MAPPING)
    pd.testing.assert_frame_equal(loaded.interactions, expected.interactions)
    pd.testing.assert_frame_equal(loaded.users, expected.users)


def test_load_data_refuses_what_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "nope.csv", CLICK_MAPPING)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without u.data"):
        load_data(tmp_path / "empty")


def test_load_data_on_a_movielens_folder_ignores_the_mapping(ml100k_dir: Path) -> None:
    loaded = load_data(ml100k_dir, CLICK_MAPPING)
    assert loaded.rows_kept == 100_000


def test_mapping_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"user": "u", "click": "c", "item_features": ["g"]}))
    mapping = ColumnMapping.from_file(path)
    assert (mapping.user, mapping.item, mapping.click, mapping.rating) == (
        "u",
        "item_id",
        "c",
        None,
    )
    assert mapping.item_features == ["g"]


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_mapping_from_yaml_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    path.write_text(
        "user: uid\nitem: iid\ntimestamp: when\nrating: stars\n"
        "user_features: [country]\nitem_features:\n  - genre\ntitle: name\n"
    )
    assert ColumnMapping.from_file(path) == RATED_MAPPING


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_mapping_file_with_an_unknown_key_is_refused(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"m{suffix}"
    content = {"click": "c", "usr": "u"}
    path.write_text(json.dumps(content))  # JSON is also valid YAML
    with pytest.raises(MappingError) as caught:
        ColumnMapping.from_file(path)
    allowed = ", ".join(ColumnMapping.model_fields)
    assert str(caught.value) == (
        f"{path}: unknown key 'usr'; the keys are {allowed} (did you mean 'user'?)"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "click: c\nuser_features: country\n",
            "field 'user_features' is 'country', not a list (columns of user side "
            "features, e.g. [country, device]). Set it to a list, e.g. the default []",
        ),
        (
            "click: c\nuser: 5\n",
            "field 'user' is 5, not a string (column of user ids (integers)). "
            "Set it to a string, e.g. the default 'user_id'",
        ),
        ("user: u\n", "the mapping must name exactly one label column"),
        ("- user\n- item\n", "the file must hold keys and values (user, item,"),
    ],
    ids=["features-not-a-list", "column-not-a-string", "no-label", "not-a-mapping"],
)
def test_mapping_file_error_names_file_field_problem_and_fix(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text(content)
    with pytest.raises(MappingError) as caught:
        ColumnMapping.from_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message
    assert "Input should be" not in message, "no raw pydantic wording"


def test_mapping_file_that_does_not_parse_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("user: u\n  item: : i\n")
    with pytest.raises(ValueError, match="--mapping .*broken.yaml does not parse"):
        ColumnMapping.from_file(path)


def test_missing_mapping_file_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--mapping points at .*nope.yaml"):
        ColumnMapping.from_file(tmp_path / "nope.yaml")


PLAIN_MAPPING = ColumnMapping(user="uid", item="iid", timestamp="when", rating="stars")


def test_csv_line_that_cannot_be_split_is_quarantined_with_its_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "uid,iid,when,stars\n1,2,100,4\n1,3,200,4,extra,fields\n1,4,300,5\n"
    )
    loaded = load_generic(path, PLAIN_MAPPING)
    assert loaded.interactions.item_id.tolist() == [2, 4]
    assert (loaded.rows_in, loaded.rows_kept, loaded.rows_quarantined) == (3, 2, 1)
    [row] = loaded.quarantine.itertuples()
    assert (row.source, row.line) == ("log.csv", 3)
    assert row.reason == "cannot be read as CSV: 6 fields where the header has 4"
    assert row.raw == "1,3,200,4,extra,fields"


def test_csv_line_numbers_are_physical_after_blank_and_comment_lines(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.csv"
    lines = [
        "uid,iid,when,stars",  # 1
        "",  # 2: blank, not a row
        "1,10,100,5",  # 3
        "",  # 4
        "   ",  # 5: whitespace only, also blank
        "# exported by the shop",  # 6: not a row of the layout
        "1,20,200,9",  # 7: bad rating
        '2,30,300,"4"',  # 8
        '3,40,400,"4',  # 9: a quoted field that goes on ...
        '"',  # 10 ... to here
        "3,50,500,0",  # 11: bad rating, after a two-line record
    ]
    path.write_text("\n".join(lines) + "\n")
    mapping = ColumnMapping(user="uid", item="iid", timestamp="when", rating="stars")
    loaded = load_generic(path, mapping)

    quarantined = dict(zip(loaded.quarantine.line, loaded.quarantine.reason))
    assert sorted(quarantined) == [6, 7, 11], loaded.quarantine.to_string()
    assert "uid '# exported by the shop'" in quarantined[6]
    assert "stars '9'" in quarantined[7] and "stars '0'" in quarantined[11]
    assert loaded.interactions.item_id.tolist() == [10, 30, 40]
    assert (loaded.rows_in, loaded.rows_kept, loaded.rows_quarantined) == (6, 3, 3)


def test_csv_line_after_blank_lines_that_cannot_be_split_has_its_true_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.csv"
    path.write_text("uid,iid,when,stars\n\n\n1,2,100,4\n\n1,3,200,4,extra\n")
    loaded = load_generic(path, PLAIN_MAPPING)
    assert loaded.quarantine.line.tolist() == [6]
    assert loaded.quarantine.reason[0].startswith("cannot be read as CSV: 5 fie")


def test_csv_byte_that_is_not_utf8_is_quarantined_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    rows = b"".join(b"1,%d,%d,4\n" % (i, i) for i in range(2, 5000))
    path.write_bytes(b"uid,iid,when,stars\n" + rows + b"1,9,\xff9,4\n1,9999,9999,4\n")
    loaded = load_generic(path, PLAIN_MAPPING)
    assert loaded.rows_in == 5000 and loaded.rows_kept == 4999
    [row] = loaded.quarantine.itertuples()
    assert row.line == 5000
    assert row.reason.startswith("cannot be read as CSV: not UTF-8")
    assert 9999 in loaded.interactions.item_id.tolist()


def test_csv_line_with_a_nul_byte_is_quarantined_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b"uid,iid,when,stars\n1,2,100,4\n1,3,200,4\x00\x00\n1,4,300,5\n")
    loaded = load_generic(path, PLAIN_MAPPING)
    assert loaded.interactions.item_id.tolist() == [2, 4]
    [row] = loaded.quarantine.itertuples()
    assert row.line == 3
    assert row.reason == "cannot be read as CSV: a NUL byte (binary data, not text)"


def test_a_header_that_is_not_utf8_stops_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b"uid,i\xffid,when,stars\n1,2,3,4\n")
    with pytest.raises(DataLayoutError, match="line 1: cannot be read as CSV: not"):
        load_generic(path, RATED_MAPPING)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "the file is empty"),
        ("\n\n", "the file is empty"),
        ("uid,uid,when\n1,2,3\n", "the header names columns ['uid'] more than once"),
    ],
    ids=["empty", "blank", "duplicate-header"],
)
def test_csv_without_a_usable_header_is_a_layout_error(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "log.csv"
    path.write_text(content)
    with pytest.raises(DataLayoutError, match=re.escape(problem)):
        load_generic(path, RATED_MAPPING)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (
            {"user": "uid", "user_features": ["uid", "country"]},
            "column 'uid' is named by both 'user' and 'user_features'",
        ),
        (
            {"user": "uid", "item": "uid"},
            "column 'uid' is named by both 'user' and 'item'",
        ),
        (
            {"user_features": ["country", "country"]},
            "user_features lists 'country' more",
        ),
        (
            {"user_features": ["shelf"], "item_features": ["shelf"]},
            "column 'shelf' is named by both 'user_features' and 'item_features'",
        ),
    ],
)
def test_a_column_with_two_roles_in_the_mapping_is_refused(
    tmp_path: Path, fields: dict, says: str
) -> None:
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps({"click": "clicked", **fields}))
    with pytest.raises(MappingError) as caught:
        ColumnMapping.from_file(path)
    assert str(caught.value).startswith(f"{path}: {says}")


def test_the_title_may_also_be_an_item_feature() -> None:
    mapping = ColumnMapping(click="clicked", item_features=["name"], title="name")
    assert mapping.title == "name"


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_a_quote_left_open_stops_the_file_at_its_line(
    tmp_path: Path, suffix: str, sep: str
) -> None:
    rows = [sep.join(["uid", "iid", "when", "stars"])]
    rows += [sep.join(["1", str(i), str(i), "4"]) for i in range(2, 400)]
    rows += [sep.join(["1", "400", "400", '"4']), sep.join(["1", "401", "401", "4"])]
    path = tmp_path / f"log{suffix}"
    path.write_text("\n".join(rows) + "\n")
    kind = suffix[1:].upper()
    with pytest.raises(DataLayoutError, match=f"line 400: cannot be read as {kind}"):
        load_generic(path, PLAIN_MAPPING)


def test_a_log_without_a_mapping_says_each_way_to_give_one(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "log.csv", RATED)
    with pytest.raises(ValueError, match="log.csv is a log file") as caught:
        load_data(path)
    message = str(caught.value)
    assert "--mapping FILE" in message and "DAG's mapping param" in message
