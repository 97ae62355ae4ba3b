"""Raw Amazon Reviews loaders (2018 and 2023 formats) on small gzip files written here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from distillrec.data.dataset import DataError
from distillrec.data.loaders import load_dataset

DAY = 86400


def _gz(path: Path, rows: list, bad: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for pos, text in sorted((bad or {}).items()):
        lines.insert(pos, text)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _load(path: Path, fmt: str, **options):
    return load_dataset({"name": "t", "format": fmt, "path": str(path), "options": options})


def _kcore_reviews() -> list[dict]:
    """Users u1..u3 each review items a,b,c (3-core holds); u4 reviews a,d (d appears once -> removed -> u4 has 1)."""
    rows = []
    for n, u in enumerate(["u1", "u2", "u3"]):
        for k, it in enumerate(["c", "a", "b"]):
            rows.append({"reviewerID": u, "asin": it, "unixReviewTime": 1000 + 10 * k + n, "overall": 5.0})
    rows.append({"reviewerID": "u4", "asin": "a", "unixReviewTime": 5})
    rows.append({"reviewerID": "u4", "asin": "d", "unixReviewTime": 6})
    rows.append({"reviewerID": "u4", "asin": "b", "unixReviewTime": 7})
    return rows


def _meta2018() -> list[dict]:
    return [
        {"asin": "a", "title": "Alpha", "brand": "BrandA", "category": ["Cell Phones", "Cases"],
         "description": ["Good", "case"], "imageURLHighRes": ["http://img/a.jpg"], "imageURL": ["http://small/a"]},
        {"asin": "b", "title": "Beta", "brand": "BrandB", "category": [], "description": "plain text",
         "imageURLHighRes": [], "imageURL": ["http://small/b"]},
        {"asin": "zz", "title": "not used"},
    ]


def test_amazon2018_kcore_sequential(tmp_path):
    _gz(tmp_path / "Toy_5.json.gz", _kcore_reviews())
    _gz(tmp_path / "meta_Toy.json.gz", _meta2018())
    ds = _load(tmp_path, "amazon2018", k=3)
    # u4: d is seen once -> dropped; then u4 has 2 reviews < 3 -> dropped; a, b, c keep 3 each
    assert ds.items.ids == ["a", "b", "c"]
    assert ds.train_users == ["u1", "u2", "u3"]
    assert [s.tolist() for s in ds.train] == [[3]] * 3  # c, then a (valid), b (test)
    assert ds.valid.targets.tolist() == [1, 1, 1] and ds.test.targets.tolist() == [2, 2, 2]
    assert ds.report.skipped["reviews removed by 3-core filtering"] == 3
    assert ds.items.text["title"] == ["Alpha", "Beta", ""]
    assert ds.items.text["category"][0] == "Cell Phones > Cases"
    assert ds.items.text["description"] == ["Good case", "plain text", ""]
    assert ds.items.text["brand"][1] == "BrandB"
    assert ds.items.image_paths == ["http://img/a.jpg", "http://small/b", None]
    assert ds.train_timestamps is not None and ds.protocol["k_core"] == 3


def test_kcore_iterates_until_stable(tmp_path):
    # 2-core: x appears twice (u1, u2); u2 also has y (once). Removing y leaves u2 with 1 review -> u2 dropped,
    # which leaves x with one review -> x dropped -> u1 has only z... everything collapses except the w/v block.
    rows = [
        {"reviewerID": "u1", "asin": "x", "unixReviewTime": 1}, {"reviewerID": "u1", "asin": "z", "unixReviewTime": 2},
        {"reviewerID": "u2", "asin": "x", "unixReviewTime": 1}, {"reviewerID": "u2", "asin": "y", "unixReviewTime": 2},
        {"reviewerID": "u3", "asin": "z", "unixReviewTime": 1},
    ] + [{"reviewerID": u, "asin": it, "unixReviewTime": t}
         for u in ("u5", "u6") for t, it in enumerate(["w", "v", "w"])]
    _gz(tmp_path / "K_5.json.gz", rows)
    ds = _load(tmp_path, "amazon2018", k=2)
    assert ds.items.ids == ["v", "w"]
    assert ds.train_users == ["u5", "u6"]
    assert ds.report.skipped["reviews removed by 2-core filtering"] == 5
    assert any("no meta file" in n for n in ds.report.notes)


def _session_reviews() -> list[dict]:
    """Users s01..s10, each reviewing popular items p0..p4 (5 users x ... ) on their first day."""
    rows = []
    t0 = 1_500_000_000
    for n in range(10):
        u = f"s{n:02d}"
        items = [f"p{(n + k) % 5}" for k in range(3)]
        for k, it in enumerate(items):
            rows.append({"reviewerID": u, "asin": it, "unixReviewTime": t0 + k * 3600})
        rows.append({"reviewerID": u, "asin": "p0", "unixReviewTime": t0 + DAY})  # next day: outside the session
    rows.append({"reviewerID": "s99", "asin": "p1", "unixReviewTime": t0})  # a length-1 session
    rows.append({"reviewerID": "s98", "asin": "rare", "unixReviewTime": t0})  # rare item + p2
    rows.append({"reviewerID": "s98", "asin": "p2", "unixReviewTime": t0 + 1})
    return rows


def test_amazon2018_session_mode(tmp_path):
    _gz(tmp_path / "S_5.json.gz", _session_reviews())
    ds = _load(tmp_path, "amazon2018", mode="session")
    sk = ds.report.skipped
    assert sk["reviews later than 24 h after the user's first review"] == 10
    assert sk["sessions of length 1"] == 1
    assert sk["clicks on items seen fewer than 5 times"] == 1  # 'rare'
    assert sk["sessions shorter than 2 after removing rare items"] == 1  # s98
    # 10 sessions, ordered by user id: 9 train (of which the last round(0.9) = 1 valid), 1 test
    assert ds.train_users == [f"s{n:02d}" for n in range(8)]
    assert ds.valid.users == ["s08"] and ds.test.users == ["s09"]
    assert all(len(s) == 3 for s in ds.train)
    assert [len(h) for h in ds.test.histories] == [2]  # one example per session: prefix -> last item
    assert ds.items.ids[ds.test.targets[0] - 1] == "p1"  # s09 reviews p4, p0, p1
    assert ds.protocol["max_session_length"] == 20


def test_session_truncation_and_unseen_test_items(tmp_path):
    t0 = 1_600_000_000
    rows = []
    for n in range(9):  # nine train-side users share items i0..i24 (long first-day sessions)
        rows += [{"reviewerID": f"a{n}", "asin": f"i{k}", "unixReviewTime": t0 + k} for k in range(25)]
    # the test user (last by id) has items i0, i24 (i24 is cut from every train session: unseen) and i1
    rows += [{"reviewerID": "z", "asin": it, "unixReviewTime": t0 + k} for k, it in enumerate(["i0", "i24", "i1"])]
    _gz(tmp_path / "T_5.json.gz", rows)
    ds = _load(tmp_path, "amazon2018", mode="session", valid_fraction=0.0)
    assert all(len(s) == 20 for s in ds.train)
    assert ds.report.skipped["items beyond the first 20 of a session"] == 9 * 5 + 0
    assert ds.report.skipped["test items unseen in training"] == 1
    assert [ds.items.ids[i - 1] for i in ds.test.histories[0]] == ["i0"]
    assert ds.items.ids[ds.test.targets[0] - 1] == "i1"
    ds5 = _load(tmp_path, "amazon2018", mode="session", valid_fraction=0.0, max_session_length=5)
    assert all(len(s) == 5 for s in ds5.train) and ds5.n_items == 5
    assert ds5.report.skipped["items beyond the first 5 of a session"] == 9 * 20
    # a test session left with one item after dropping unseen ones is dropped (and counted)
    rows = [r for r in rows if r["reviewerID"] != "z"]
    rows += [{"reviewerID": "z", "asin": it, "unixReviewTime": t0 + k} for k, it in enumerate(["i0", "i22"])]
    (tmp_path / "short").mkdir()
    _gz(tmp_path / "short" / "T_5.json.gz", rows)
    ds2 = _load(tmp_path / "short", "amazon2018", mode="session", valid_fraction=0.0)
    assert ds2.report.skipped["test sessions shorter than 2 after removing unseen items"] == 1
    assert len(ds2.test) == 0


def test_amazon2023_format(tmp_path):
    rows = []
    for n, u in enumerate(["U1", "U2", "U3"]):
        for k, it in enumerate(["P1", "P2", "P3"]):
            rows.append({"user_id": u, "parent_asin": it, "asin": it + "-v", "timestamp": (1000 + k * 10 + n) * 1000,
                         "rating": 4.0})
    _gz(tmp_path / "Toys.jsonl.gz", rows)
    _gz(tmp_path / "meta_Toys.jsonl.gz", [
        {"parent_asin": "P1", "title": "One", "store": "StoreX", "categories": ["Toys", "Blocks"],
         "description": ["d1", "d2"], "images": [{"hi_res": None, "large": "http://l/1"}]},
        {"parent_asin": "P2", "title": "Two", "store": "S", "categories": [], "description": [],
         "images": [{"hi_res": "http://h/2", "large": "http://l/2"}]},
    ])
    ds = _load(tmp_path, "amazon2023", k=3)
    assert ds.items.ids == ["P1", "P2", "P3"]
    assert ds.items.text["brand"][0] == "StoreX"
    assert ds.items.text["category"][0] == "Toys > Blocks"
    assert ds.items.text["description"][0] == "d1 d2"
    assert ds.items.image_paths == ["http://l/1", "http://h/2", None]
    assert ds.train_timestamps[0].tolist() == [1000.0]  # milliseconds -> seconds
    ds2 = _load(tmp_path / "Toys.jsonl.gz", "amazon2023", k=3)  # a file path names the category
    assert ds2.protocol["category"] == "Toys"


def test_malformed_lines_are_counted(tmp_path):
    _gz(tmp_path / "Toy_5.json.gz", _kcore_reviews(), bad={0: "{not json", 4: "[1, 2]", 6: '{"reviewerID": "u9"}'})
    ds = _load(tmp_path, "amazon2018", k=3)
    assert ds.report.skipped["malformed JSON lines in Toy_5.json.gz"] == 2
    assert ds.report.skipped["review lines in Toy_5.json.gz without user, item or time"] == 1
    notes = " ".join(ds.report.notes)
    assert "Toy_5.json.gz line 1: malformed JSON" in notes and "Toy_5.json.gz line 5" in notes
    assert "Toy_5.json.gz line 7: lacks" in notes
    assert len(ds.train) == 3


def test_all_lines_malformed_raises(tmp_path):
    with gzip.open(tmp_path / "Bad_5.json.gz", "wt") as f:
        f.write("{'reviewerID': 'python dict, not JSON'}\nnope\n")
    with pytest.raises(DataError, match=r"Bad_5\.json\.gz, line 1: no line is valid JSON"):
        _load(tmp_path, "amazon2018")


def test_bad_files(tmp_path):
    (tmp_path / "Bad_5.json.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"Bad_5\.json\.gz: cannot be read"):
        _load(tmp_path, "amazon2018")
    with gzip.open(tmp_path / "Bad_5.json.gz", "wt") as f:
        f.write("\n")
    with pytest.raises(DataError, match=r"Bad_5\.json\.gz: the file is empty"):
        _load(tmp_path, "amazon2018")
    with pytest.raises(DataError, match=r"Other_5\.json\.gz: review file not found"):
        _load(tmp_path, "amazon2018", category="Other")
    _gz(tmp_path / "Bad_5.json.gz", _kcore_reviews())
    with pytest.raises(DataError, match="option mode='weekly'"):
        _load(tmp_path, "amazon2018", mode="weekly")
    with pytest.raises(DataError, match=r"no user is left after 9-core"):
        _load(tmp_path, "amazon2018", k=9)
