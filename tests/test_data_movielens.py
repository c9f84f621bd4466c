"""data.movielens: the real MovieLens-100K, and synthetic folders with bad rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data.movielens import GENRES, load_movielens
from data.schema import DataLayoutError

# --- the real dataset -----------------------------------------------------------


@pytest.fixture(scope="module")
def real(ml100k_dir: Path):
    return load_movielens(ml100k_dir)


def test_real_ml100k_keeps_every_rating(real) -> None:
    assert real.rows_in == 100_000
    assert real.rows_kept == 100_000
    assert real.rows_quarantined == 0
    assert len(real.quarantine) == 0, real.quarantine.head().to_string()


def test_real_ml100k_has_943_users_and_1682_items(real) -> None:
    assert len(real.users) == 943
    assert real.users.user_id.is_unique
    assert len(real.items) == 1682
    assert real.items.item_id.is_unique
    assert real.interactions.user_id.nunique() == 943
    assert real.interactions.item_id.nunique() == 1682


def test_real_ml100k_clicks_are_ratings_of_four_and_up(real) -> None:
    frame = real.interactions
    assert set(frame.rating.unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert (frame.click == (frame.rating >= 4).astype("int8")).all()


def test_real_ml100k_latin1_titles_decode(real) -> None:
    titles = real.items.set_index("item_id").title
    non_ascii = [t for t in titles if not t.isascii()]
    assert non_ascii, "expected titles with accented characters"
    assert all(isinstance(t, str) for t in non_ascii)
    assert any("Misérables" in t for t in non_ascii), non_ascii[:5]
    # UTF-8 mojibake ("Ã©") or replacement characters would mean a wrong codec.
    assert not [t for t in titles if "\ufffd" in t or "Ã" in t]


def test_real_ml100k_users_and_genres(real) -> None:
    user1 = real.users.set_index("user_id").loc[1]
    assert (user1.age, user1.gender, user1.occupation, user1.zip) == (
        "24",
        "M",
        "technician",
        "85711",
    )
    toy_story = real.items.set_index("item_id").loc[1]
    assert toy_story.title == "Toy Story (1995)"
    assert toy_story.genres == ["Animation", "Children's", "Comedy"]


# --- synthetic folders -------------------------------------------------------------

USERS = [
    "1|24|M|technician|85711",
    "2|53|F|other|94043",
    "3|23|M|writer|T8H1N",
]
FLAGS_ACTION = "|".join("1" if g == "Action" else "0" for g in GENRES)
FLAGS_DRAMA_WAR = "|".join("1" if g in ("Drama", "War") else "0" for g in GENRES)
ITEMS = [
    f"10|Toy Story (1995)|01-Jan-1995||http://x/10|{FLAGS_ACTION}",
    f"20|Misérables, Les (1995)|01-Jan-1995||http://x/20|{FLAGS_DRAMA_WAR}",
    f"30|Nénette et Boni (1996)|01-Jan-1996||http://x/30|{FLAGS_ACTION}",
]
RATINGS = [
    "1\t10\t5\t100",
    "1\t20\t3\t101",
    "2\t10\t4\t102",
    "2\t30\t1\t103",
    "3\t20\t2\t104",
    "3\t30\t5\t105",
]


def write_movielens(
    folder: Path,
    users: list[str] = USERS,
    items: list[str] = ITEMS,
    ratings: list[str] = RATINGS,
    newline: str = "\n",
) -> Path:
    """Writes u.user, u.item and u.data in the real layout, Latin-1 encoded."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("u.user", users), ("u.item", items), ("u.data", ratings)):
        text = "".join(line + newline for line in lines)
        (folder / name).write_bytes(text.encode("latin-1"))
    return folder


def only_quarantined(loaded, source: str) -> dict:
    rows = loaded.quarantine
    assert len(rows) == 1, rows.to_string()
    row = rows.iloc[0].to_dict()
    assert row["source"] == source
    return row


def test_clean_synthetic_folder_loads_every_row(tmp_path: Path) -> None:
    loaded = load_movielens(write_movielens(tmp_path))
    assert (loaded.rows_in, loaded.rows_kept, loaded.rows_quarantined) == (6, 6, 0)
    frame = loaded.interactions
    assert frame.user_id.tolist() == [1, 1, 2, 2, 3, 3]
    assert frame.item_id.tolist() == [10, 20, 10, 30, 20, 30]
    assert frame.rating.tolist() == [5.0, 3.0, 4.0, 1.0, 2.0, 5.0]
    assert frame.click.tolist() == [1, 0, 1, 0, 0, 1]
    assert frame.timestamp.tolist() == [100, 101, 102, 103, 104, 105]
    items = loaded.items.set_index("item_id")
    assert items.loc[20, "title"] == "Misérables, Les (1995)"
    assert items.loc[20, "genres"] == ["Drama", "War"]
    assert loaded.users.set_index("user_id").loc[3, "zip"] == "T8H1N"


def test_crlf_line_endings_load_like_lf(tmp_path: Path) -> None:
    lf = load_movielens(write_movielens(tmp_path / "lf"))
    crlf = load_movielens(write_movielens(tmp_path / "crlf", newline="\r\n"))
    assert crlf.interactions.equals(lf.interactions)
    assert crlf.users.equals(lf.users)
    assert crlf.items.equals(lf.items)


def test_blank_lines_are_neither_kept_nor_quarantined(tmp_path: Path) -> None:
    ratings = [RATINGS[0], "", "   ", *RATINGS[1:]]
    loaded = load_movielens(write_movielens(tmp_path, ratings=ratings))
    assert (loaded.rows_in, loaded.rows_kept, loaded.rows_quarantined) == (6, 6, 0)


@pytest.mark.parametrize(
    ("bad_line", "reason_part"),
    [
        ("1\t10\t5", "expected 4 fields, found 3"),
        ("1\t10\t5\t100\t7", "expected 4 fields, found 5"),
        ("one\t10\t5\t200", "must be integers"),
        ("1\tten\t5\t200", "must be integers"),
        ("1\t10\t5\tnoon", "must be integers"),
        ("--1\t10\t5\t200", "must be integers"),
        ("1\t10\t0\t200", "rating '0' is not an integer from 1 to 5"),
        ("1\t10\t6\t200", "rating '6' is not an integer from 1 to 5"),
        ("1\t10\t3.5\t200", "rating '3.5'"),
        ("1\t10\t²\t200", "rating '²'"),
        ("99\t10\t5\t200", "unknown user 99"),
        ("1\t999\t5\t200", "unknown item 999"),
        (RATINGS[2], "duplicate of line 3 (same user, item and timestamp)"),
    ],
    ids=[
        "too-few-fields",
        "too-many-fields",
        "user-not-numeric",
        "item-not-numeric",
        "timestamp-not-numeric",
        "double-minus",
        "rating-0",
        "rating-6",
        "rating-fraction",
        "rating-superscript",
        "unknown-user",
        "unknown-item",
        "duplicate",
    ],
)
def test_bad_rating_row_is_quarantined(
    tmp_path: Path, bad_line: str, reason_part: str
) -> None:
    # The bad line goes fifth, after the row it may duplicate.
    ratings = [*RATINGS[:4], bad_line, *RATINGS[4:]]
    loaded = load_movielens(write_movielens(tmp_path, ratings=ratings))

    row = only_quarantined(loaded, "u.data")
    assert row["line"] == 5
    assert reason_part in row["reason"]
    assert row["raw"] == bad_line
    assert loaded.rows_in == len(RATINGS) + 1
    assert loaded.rows_kept == len(RATINGS)
    assert loaded.rows_in == loaded.rows_kept + loaded.rows_quarantined
    assert loaded.rows_quarantined == len(loaded.quarantine)


def test_same_user_and_item_at_another_time_is_not_a_duplicate(tmp_path: Path) -> None:
    ratings = [*RATINGS, "1\t10\t2\t999"]
    loaded = load_movielens(write_movielens(tmp_path, ratings=ratings))
    assert loaded.rows_kept == len(RATINGS) + 1
    assert len(loaded.quarantine) == 0


@pytest.mark.parametrize(
    ("bad_user", "reason_part"),
    [
        ("2|old|F|other|94043", "age 'old' is not an integer"),
        ("2|0|F|other|94043", "age '0'"),
        ("2|-|F|other|94043", "age '-'"),
        ("x2|53|F|other|94043", "user id 'x2' is not a non-negative integer"),
        ("2|53|F|other", "expected 5 fields, found 4"),
    ],
    ids=["age-word", "age-zero", "age-dash", "id-not-numeric", "field-count"],
)
def test_bad_user_row_is_quarantined_and_its_ratings_follow(
    tmp_path: Path, bad_user: str, reason_part: str
) -> None:
    users = [USERS[0], bad_user, USERS[2]]
    loaded = load_movielens(write_movielens(tmp_path, users=users))

    refused = loaded.quarantine
    user_rows = refused[refused.source == "u.user"]
    assert len(user_rows) == 1, refused.to_string()
    assert user_rows.iloc[0].line == 2
    assert reason_part in user_rows.iloc[0].reason
    assert 2 not in set(loaded.users.user_id)
    # User 2's two ratings now name an unknown user.
    data_rows = refused[refused.source == "u.data"]
    assert data_rows.line.tolist() == [3, 4]
    assert all("unknown user 2" in r for r in data_rows.reason)
    assert loaded.rows_in == len(RATINGS)
    assert loaded.rows_kept == len(RATINGS) - 2
    assert loaded.rows_in == loaded.rows_kept + loaded.rows_quarantined


def test_user_listed_twice_keeps_the_first(tmp_path: Path) -> None:
    users = [*USERS, "1|60|F|doctor|00000"]
    loaded = load_movielens(write_movielens(tmp_path, users=users))
    row = only_quarantined(loaded, "u.user")
    assert (row["line"], row["reason"]) == (4, "user 1 is listed twice")
    assert loaded.users.set_index("user_id").loc[1, "age"] == "24"


@pytest.mark.parametrize(
    ("flags", "reason_part"),
    [
        (FLAGS_ACTION.replace("1", "2"), "genre flags must each be 0 or 1"),
        (FLAGS_ACTION.replace("0", "yes", 1), "genre flags must each be 0 or 1"),
    ],
    ids=["flag-2", "flag-word"],
)
def test_bad_item_row_is_quarantined_and_its_ratings_follow(
    tmp_path: Path, flags: str, reason_part: str
) -> None:
    items = [ITEMS[0], ITEMS[1], f"30|Bad (1996)|01-Jan-1996||http://x/30|{flags}"]
    loaded = load_movielens(write_movielens(tmp_path, items=items))

    refused = loaded.quarantine
    item_rows = refused[refused.source == "u.item"]
    assert item_rows.line.tolist() == [3]
    assert reason_part in item_rows.iloc[0].reason
    assert 30 not in set(loaded.items.item_id)
    data_rows = refused[refused.source == "u.data"]
    assert all("unknown item 30" in r for r in data_rows.reason)
    assert len(data_rows) == 2
    assert loaded.rows_in == loaded.rows_kept + loaded.rows_quarantined


def test_item_listed_twice_keeps_the_first(tmp_path: Path) -> None:
    items = [*ITEMS, f"10|Impostor (2000)|01-Jan-2000||http://x|{FLAGS_DRAMA_WAR}"]
    loaded = load_movielens(write_movielens(tmp_path, items=items))
    row = only_quarantined(loaded, "u.item")
    assert (row["line"], row["reason"]) == (4, "item 10 is listed twice")
    assert loaded.items.set_index("item_id").loc[10, "title"] == "Toy Story (1995)"


def test_rows_in_counts_every_kind_of_refusal(tmp_path: Path) -> None:
    ratings = [
        *RATINGS,
        "1\t10",  # field count
        "x\t10\t5\t1",  # not numeric
        "1\t10\t9\t1",  # rating
        "7\t10\t5\t1",  # unknown user
        "1\t70\t5\t1",  # unknown item
        RATINGS[0],  # duplicate
    ]
    loaded = load_movielens(write_movielens(tmp_path, ratings=ratings))
    assert loaded.rows_in == len(ratings)
    assert loaded.rows_kept == len(RATINGS)
    assert loaded.rows_quarantined == 6
    assert loaded.rows_in == loaded.rows_kept + loaded.rows_quarantined
    assert loaded.quarantine.line.tolist() == list(range(7, 13))


# --- files that are not the layout -------------------------------------------------


def test_csv_in_place_of_u_data_is_a_layout_error(tmp_path: Path) -> None:
    ratings = ["user_id,item_id,rating,timestamp", "1,10,5,100"]
    folder = write_movielens(tmp_path, ratings=ratings)
    with pytest.raises(DataLayoutError) as caught:
        load_movielens(folder)
    message = str(caught.value)
    assert "u.data" in message
    assert "line 1" in message
    assert "expected 4 fields" in message
    assert caught.value.line == 1
    assert caught.value.path.name == "u.data"


def test_layout_error_counts_leading_blank_lines(tmp_path: Path) -> None:
    folder = write_movielens(tmp_path, ratings=["", "1,10,5,100"])
    with pytest.raises(DataLayoutError, match=r"u\.data, line 2:"):
        load_movielens(folder)


def test_u_item_with_wrong_first_line_is_a_layout_error(tmp_path: Path) -> None:
    items = ["10|Toy Story (1995)|action", *ITEMS]
    with pytest.raises(DataLayoutError, match=r"u\.item, line 1: expected 24 fields"):
        load_movielens(write_movielens(tmp_path, items=items))


def test_u_user_with_wrong_first_line_is_a_layout_error(tmp_path: Path) -> None:
    users = ["1,24,M,technician,85711", *USERS]
    with pytest.raises(DataLayoutError, match=r"u\.user, line 1: expected 5 fields"):
        load_movielens(write_movielens(tmp_path, users=users))


def test_mostly_bad_lines_is_a_layout_error_at_the_first_bad_one(
    tmp_path: Path,
) -> None:
    # 3 of 5 lines have the wrong field count: over half.
    ratings = [RATINGS[0], RATINGS[1], "1 10 5 100", "2 10 4 102", "3 20 2 104"]
    with pytest.raises(DataLayoutError) as caught:
        load_movielens(write_movielens(tmp_path, ratings=ratings))
    assert "u.data" in str(caught.value)
    assert "line 3" in str(caught.value)
    assert "3 of 5 lines" in str(caught.value)
    assert caught.value.line == 3


def test_exactly_half_bad_lines_still_loads(tmp_path: Path) -> None:
    ratings = [RATINGS[0], RATINGS[1], "1 10 5 100", "2 10 4 102"]
    loaded = load_movielens(write_movielens(tmp_path, ratings=ratings))
    assert (loaded.rows_in, loaded.rows_kept, loaded.rows_quarantined) == (4, 2, 2)


@pytest.mark.parametrize("name", ["u.data", "u.user", "u.item"])
def test_missing_file_is_named(tmp_path: Path, name: str) -> None:
    folder = write_movielens(tmp_path)
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / name))):
        load_movielens(folder)
