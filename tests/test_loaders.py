"""Loaders: the real datasets (skipped when absent) and small hand-written fixtures, bad input included."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from distillrec.data.dataset import DataError
from distillrec.data.export import export_recbole, read_recbole_inter
from distillrec.data.loaders import data_root, load_dataset


def _real(name: str):
    root = data_root()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"real dataset folder '{name}' not found under the data root ({root}); "
                    "set DISTILLREC_DATA_ROOT to run this test")
    return load_dataset({"name": name})


def _loo_consistent(ds) -> None:
    for seq, vh, vt, th in zip(ds.train, ds.valid.histories, ds.valid.targets, ds.test.histories):
        assert np.array_equal(seq, vh)
        assert np.array_equal(np.append(seq, vt), th)


# ------------------------------------------------------------------------------------------------ real datasets

@pytest.mark.parametrize("name,users,items,inter", [
    ("amazon2018-scientific-mm", 2928, 1585, 19712),
    ("amazon2018-scientific-text", 8442, 4385, 59427),  # 59,384 in SOURCE.txt counts 6 histories cut to 50 items
    ("amazon2014-beauty", 22363, 12101, 198502),
    ("amazon2014-sports", 35598, 18357, 296337),
    ("microlens-50k", 50000, 19220, 359708),
])
def test_real_leave_one_out(name, users, items, inter):
    ds = _real(name)
    st = ds.statistics()
    assert st["items"] == items
    assert st["train_sequences"] == users == len(ds.valid) == len(ds.test)
    assert st["train_interactions"] + 2 * users == inter
    assert not ds.report.skipped
    _loo_consistent(ds)
    for part in (ds.train, ds.test.histories):
        flat = np.concatenate(part)
        assert flat.min() >= 1 and flat.max() <= items


def test_real_scientific_mm_features_and_text():
    ds = _real("amazon2018-scientific-mm")
    assert ds.items.features["text_clip"].shape == (1586, 512)
    assert ds.items.features["image_clip"].shape == (1586, 512)
    assert not ds.items.features["image_clip"][0].any()
    assert all(ds.items.text["text"])
    raw = np.fromfile(data_root() / "amazon2018-scientific-mm" / "Scientific.feat1CLS", np.float32).reshape(-1, 512)
    assert np.array_equal(ds.items.features["text_clip"][1:], raw)
    assert ds.items.ids[0] == "B00O47ILVA"  # index 0 of item2index = internal id 1


def test_real_beauty_text():
    ds = _real("amazon2014-beauty")
    assert ds.items.ids[0] == "B004756YJA"
    assert ds.items.text["attributes"][0] == "OPI, Makeup, Nails, Nail Polish"
    assert ds.items.text["textual_id"][0] == "nail lacquer simmer and shimmer"


def test_real_cellphones_sessions():
    ds = _real("amazon-cellphones-sessions")
    assert ds.n_items == 10213
    assert len(ds.test) == 4644
    # the MACL files hold one row per session (not prefix-augmented): 41,615 sessions, 10% to valid
    assert ds.protocol["train_rows_augmented"] is False
    assert len(ds.train) + len(ds.valid) == 41615
    assert len(ds.valid) == round(41615 * 0.1)


def test_real_click_logs():
    dg = _real("diginetica-sample")
    assert dg.n_items > 0 and len(dg.test) > 0 and len(dg.valid) > 0
    assert dg.report.skipped["sessions of length 1"] > 0
    yc = _real("yoochoose-100k")
    assert len(yc.train) > 10000 and len(yc.test) > 0 and len(yc.valid) > 0
    assert yc.n_items <= 2933


# ------------------------------------------------------------------------------------------------ recbole_atomic

def _write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def _recbole(tmp: Path, train_extra: str = "") -> Path:
    h = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    _write(tmp / "S.item2index", "A\t0\nB\t1\nC\t2\nD\t3\n")
    _write(tmp / "S.user2index", "u0\t0\nu1\t1\n")
    _write(tmp / "S.text", "item_id:token\ttext:token_seq\nA\talpha\nB\tbeta\nC\tgamma\nZ\tzeta\n")
    _write(tmp / "S.train.inter", h + "0\t0 1\t2\n0\t0\t1\n1\t3\t0\n" + train_extra)
    _write(tmp / "S.valid.inter", h + "0\t0 1 2\t3\n1\t3 0\t1\n")
    _write(tmp / "S.test.inter", h + "0\t0 1 2 3\t0\n1\t3 0 1\t2\n")
    np.arange(8, dtype=np.float32).reshape(4, 2).tofile(tmp / "S.feat1CLS")
    return tmp


def test_recbole_fixture(tmp_path):
    ds = load_dataset({"name": "x", "format": "recbole_atomic", "path": str(_recbole(tmp_path)),
                       "options": {"feature_dim": 2}})
    assert ds.items.ids == ["A", "B", "C", "D"]
    assert [s.tolist() for s in ds.train] == [[1, 2, 3], [4, 1]]
    assert ds.train_users == ["u0", "u1"]
    assert ds.valid.targets.tolist() == [4, 2] and ds.test.targets.tolist() == [1, 3]
    _loo_consistent(ds)
    assert ds.items.text["text"] == ["alpha", "beta", "gamma", ""]
    assert ds.report.skipped["S.text: text rows for items not in the item table"] == 1
    assert ds.items.features["text_clip"].shape == (5, 2)
    assert ds.items.features["text_clip"][1].tolist() == [0, 1]
    assert "image_clip" not in ds.items.features


def test_recbole_inconsistent_rows_counted(tmp_path):
    ds = load_dataset({"name": "x", "format": "recbole_atomic", "path": str(_recbole(tmp_path, "0\t3\t2\n")),
                       "options": {"feature_dim": 2}})
    assert sum(v for k, v in ds.report.skipped.items() if "fit no consistent" in k) == 1
    assert ds.train[0].tolist() == [1, 2, 3]


def test_recbole_cut_histories_restored(tmp_path):
    h = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    _write(tmp_path / "S.item2index", "".join(f"i{k}\t{k}\n" for k in range(8)))
    # histories cut to their last 3 items; the user's sequence is 0 1 2 3 4 5 6 7
    _write(tmp_path / "S.train.inter", h + "0\t0\t1\n0\t0 1\t2\n0\t0 1 2\t3\n0\t1 2 3\t4\n0\t2 3 4\t5\n")
    _write(tmp_path / "S.valid.inter", h + "0\t3 4 5\t6\n")
    _write(tmp_path / "S.test.inter", h + "0\t4 5 6\t7\n")
    ds = load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path)})
    assert ds.train[0].tolist() == [1, 2, 3, 4, 5, 6]
    _loo_consistent(ds)
    assert not ds.report.skipped
    assert any("restored" in n for n in ds.report.notes)


def test_recbole_bad_inputs(tmp_path):
    _recbole(tmp_path)
    p = tmp_path / "S.valid.inter"
    p.write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 x\t1\n")
    with pytest.raises(DataError, match=r"S\.valid\.inter, line 2: .*'x'"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})
    p.write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1\t9\n")
    with pytest.raises(DataError, match=r"S\.valid\.inter, line 2: item index 9 is outside 0\.\.3"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})
    p.write_text("user_id:token\titem:token\n")
    with pytest.raises(DataError, match=r"S\.valid\.inter, line 1: header .* lacks column"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})
    p.write_text("")
    with pytest.raises(DataError, match=r"S\.valid\.inter: the file is empty"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})
    p.unlink()
    with pytest.raises(DataError, match=r"S\.valid\.inter: valid interaction file not found"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})


def test_recbole_bad_features(tmp_path):
    _recbole(tmp_path)
    np.zeros(7, np.float32).tofile(tmp_path / "S.feat3CLS")
    with pytest.raises(DataError, match=r"S\.feat3CLS: 7 float32 values is not a multiple of feature_dim=2"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})
    np.zeros(6, np.float32).tofile(tmp_path / "S.feat3CLS")
    with pytest.raises(DataError, match=r"S\.feat3CLS: feature 'image_clip' has 3 rows"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})


# ------------------------------------------------------------------------------------------------ s3rec

def test_s3rec_fixture(tmp_path):
    _write(tmp_path / "Toy.txt", "1 1 2 3 4\n2 2 3 1\n3 4 5\n")
    _write(tmp_path / "toy_item_meta.tsv", "item_id\tasin\tattributes\tidgen_textual_id\n"
           "1\tA1\tBrandX|Cat|Sub\tred lipstick\n2\tA2\tBrandY\tblue\n3\t\t\t\n4\tA4\tZ\tz\n5\tA5\tQ\tq\n")
    ds = load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})
    assert ds.items.ids == ["A1", "A2", "3", "A4", "A5"]
    assert ds.items.text["attributes"][0] == "BrandX, Cat, Sub"
    assert ds.items.text["textual_id"][1] == "blue"
    assert [s.tolist() for s in ds.train] == [[1, 2], [2]]
    assert ds.test.targets.tolist() == [4, 1]
    assert ds.report.skipped == {"users with fewer than 3 interactions (leave-one-out needs 3)": 1}


def test_s3rec_bad_inputs(tmp_path):
    _write(tmp_path / "Toy.txt", "1 1 2 3\n2 2 b 1\n")
    with pytest.raises(DataError, match=r"Toy\.txt, line 2: .*'b'.*not an integer"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})
    _write(tmp_path / "Toy.txt", "1 1 2 3\n2 0 2 1\n")
    with pytest.raises(DataError, match=r"Toy\.txt, line 2: item id 0"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})
    _write(tmp_path / "Toy.txt", "1 1 2 3\n")
    _write(tmp_path / "toy_item_meta.tsv", "asin\tattributes\nA\tb\n")
    with pytest.raises(DataError, match=r"toy_item_meta\.tsv, line 1: header .* lacks column\(s\) \['item_id'\]"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})


# ------------------------------------------------------------------------------------------------ session_tsv

def test_session_tsv_augmented(tmp_path):
    # sessions [1 2 3 4], [5 6 7], [2 3 8]: every prefix as a row; the last one (10%: 0.3 -> 0 rows; use 0.34)
    rows = ["1\t2", "1 2\t3", "1 2 3\t4", "5\t6", "5 6\t7", "2\t3", "2 3\t8"]
    _write(tmp_path / "toy_train.tsv", "session_prefix\ttarget\n" + "\n".join(rows) + "\n")
    _write(tmp_path / "toy_test.tsv", "session_prefix\ttarget\n1 2\t8\n5\t6\n")
    ds = load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path),
                       "options": {"valid_fraction": 0.34}})
    assert ds.protocol["train_rows_augmented"] is True
    assert [s.tolist() for s in ds.train] == [[1, 2, 3, 4], [5, 6, 7]]
    assert [h.tolist() for h in ds.valid.histories] == [[2], [2, 3]]
    assert ds.valid.targets.tolist() == [3, 8]
    assert ds.test.targets.tolist() == [8, 6] and ds.n_items == 8


def test_session_tsv_one_row_per_session(tmp_path):
    rows = ["1\t2", "3 4\t5", "6\t7", "1 2\t9", "8 9 1\t2"]
    _write(tmp_path / "toy_train.tsv", "session_prefix\ttarget\n" + "\n".join(rows) + "\n")
    _write(tmp_path / "toy_test.tsv", "session_prefix\ttarget\n1\t2\n")
    ds = load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path),
                       "options": {"valid_fraction": 0.2}})
    assert ds.protocol["train_rows_augmented"] is False
    assert [s.tolist() for s in ds.train] == [[1, 2], [3, 4, 5], [6, 7], [1, 2, 9]]
    assert [h.tolist() for h in ds.valid.histories] == [[8, 9, 1]] and ds.valid.targets.tolist() == [2]


def test_session_tsv_bad_inputs(tmp_path):
    _write(tmp_path / "toy_test.tsv", "session_prefix\ttarget\n1\t2\n")
    _write(tmp_path / "toy_train.tsv", "session_prefix\ttarget\n1\t2\n3 x\t4\n")
    with pytest.raises(DataError, match=r"toy_train\.tsv, line 3: item id 'x'"):
        load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path)})
    _write(tmp_path / "toy_train.tsv", "prefix\ttarget\n1\t2\n")
    with pytest.raises(DataError, match=r"toy_train\.tsv, line 1: header .*session_prefix"):
        load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path)})
    _write(tmp_path / "toy_train.tsv", "session_prefix\ttarget\n1\t\n")
    with pytest.raises(DataError, match=r"toy_train\.tsv, line 2: needs a non-empty prefix"):
        load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path)})
    (tmp_path / "toy_test.tsv").unlink()
    _write(tmp_path / "toy_train.tsv", "session_prefix\ttarget\n1\t2\n")
    with pytest.raises(DataError, match=r"toy_test\.tsv: file not found"):
        load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path)})


# ------------------------------------------------------------------------------------------------ microlens

def test_microlens_fixture(tmp_path):
    _write(tmp_path / "ML_pairs.tsv", "u1\t10 20 30 40\nu2\t20 30\nu3\t40 10 50\n")
    _write(tmp_path / "ML_titles.csv", 'item,title\n10,"a, quoted ""title"""\n20,b\n30,c\n40,d\n50,e\n99,unused\n')
    ds = load_dataset({"name": "m", "format": "microlens", "path": str(tmp_path)})
    assert ds.items.ids == ["10", "20", "30", "40", "50"]
    assert ds.items.text["title"][0] == 'a, quoted "title"'
    assert [s.tolist() for s in ds.train] == [[1, 2], [4]]
    assert ds.test.targets.tolist() == [4, 5]
    assert ds.report.skipped["ML_titles.csv: titles of items in no sequence"] == 1
    assert ds.report.skipped["users with fewer than 3 interactions (leave-one-out needs 3)"] == 1


def test_microlens_bad_inputs(tmp_path):
    _write(tmp_path / "ML_pairs.tsv", "u1\t10 20 30\nu2 20 30\n")
    with pytest.raises(DataError, match=r"ML_pairs\.tsv, line 2: no tab after the user id"):
        load_dataset({"name": "m", "format": "microlens", "path": str(tmp_path)})
    _write(tmp_path / "ML_pairs.tsv", "u1\t10 20 30\n")
    _write(tmp_path / "ML_titles.csv", "id,name\n10,a\n")
    with pytest.raises(DataError, match=r"ML_titles\.csv, line 1: header"):
        load_dataset({"name": "m", "format": "microlens", "path": str(tmp_path)})
    _write(tmp_path / "ML_titles.csv", "item,title\n10,a\nx,b\n")
    with pytest.raises(DataError, match=r"ML_titles\.csv, row 3: item 'x'"):
        load_dataset({"name": "m", "format": "microlens", "path": str(tmp_path)})


# ------------------------------------------------------------------------------------------------ click logs

def _digi(tmp: Path) -> Path:
    rows = ["session_id;user_id;item_id;timeframe;eventdate"]
    # popular items 1..3 (>= 5 clicks), rare item 9; sessions 1-6 early (Jan), 7-8 late (test: within 7 days)
    sess = {1: ([1, 2, 3], "2016-01-01"), 2: ([2, 1], "2016-01-02"), 3: ([3, 1, 9], "2016-01-03"),
            4: ([1, 3, 2], "2016-01-20"), 5: ([2, 3], "2016-01-21"), 6: ([7], "2016-01-21"),
            7: ([3, 2, 1], "2016-02-01"), 8: ([1, 9], "2016-02-02")}
    for s, (items, date) in sess.items():
        for k, i in reversed(list(enumerate(items))):  # written out of time order: the loader sorts by timeframe
            rows.append(f"{s};NA;{i};{100 * k};{date}")
    return _write(tmp / "clicks.csv", "\n".join(rows) + "\n")


def test_diginetica_fixture(tmp_path):
    _digi(tmp_path)
    ds = load_dataset({"name": "d", "format": "diginetica", "path": str(tmp_path)})
    sk = ds.report.skipped
    assert sk["sessions of length 1"] == 1
    assert sk["clicks on items seen fewer than 5 times"] == 2  # item 9 twice
    assert sk["sessions shorter than 2 after removing rare items"] == 1  # session 8
    assert [ds.items.ids[i - 1] for i in ds.train[0]] == ["1", "2", "3"]
    assert ds.train_users == ["1", "2", "3"]  # sessions 4, 5 are in the last 7 days of training -> valid
    assert len(ds.valid) == 3  # [1 3 2] gives 2 prefixes, [2 3] one
    assert ds.test.users == ["7", "7"]
    assert [ds.items.ids[i - 1] for i in ds.test.targets] == ["2", "1"]


def test_diginetica_bad_inputs(tmp_path):
    _write(tmp_path / "clicks.csv", "session_id;user_id;item_id;eventdate\n1;NA;2;2016-01-01\n")
    with pytest.raises(DataError, match=r"clicks\.csv, line 1: header .* lacks the column 'timeframe'"):
        load_dataset({"name": "d", "format": "diginetica", "path": str(tmp_path)})
    _write(tmp_path / "clicks.csv", "session_id;user_id;item_id;timeframe;eventdate\n1;NA;2;soon;2016-01-01\n")
    with pytest.raises(DataError, match=r"clicks\.csv, line 2: timeframe 'soon' is not a number"):
        load_dataset({"name": "d", "format": "diginetica", "path": str(tmp_path)})


def test_yoochoose_fixture(tmp_path):
    h = "SessionId\tItemId\tTime\n"
    _write(tmp_path / "yc_train_tr.txt", h + "1\t10\t5\n1\t11\t3\n2\t11\t1\n2\t12\t2\n3\t10\t1\n")
    _write(tmp_path / "yc_train_valid.txt", h + "4\t10\t1\n4\t13\t2\n4\t11\t3\n")
    _write(tmp_path / "yc_test.txt", h + "5\t12\t1\n5\t10\t2\n6\t13\t1\n6\t10\t2\n")
    _write(tmp_path / "yc_train_full.txt", h + "1\t11\t3\n1\t10\t5\n4\t13\t1\n4\t10\t2\n")
    ds = load_dataset({"name": "y", "format": "yoochoose", "path": str(tmp_path)})
    assert [[ds.items.ids[i - 1] for i in s] for s in ds.train] == [["11", "10"], ["11", "12"]]
    assert ds.report.skipped["training sessions shorter than 2"] == 1
    assert [h.tolist() for h in ds.valid.histories] == [[2]] and ds.valid.targets.tolist() == [1]
    assert ds.report.skipped["valid clicks on items unseen in training"] == 1
    assert ds.report.skipped["test sessions shorter than 2 after removing unseen items"] == 1
    assert len(ds.test) == 1
    full = load_dataset({"name": "y", "format": "yoochoose", "path": str(tmp_path),
                         "options": {"use_train_full": True}})
    assert len(full.train) == 2 and len(full.valid) == 0 and full.test.users == ["6"]  # item 12 unseen
    (tmp_path / "yc_test.txt").write_text(h + "5\t12\tlate\n")
    with pytest.raises(DataError, match=r"yc_test\.txt, line 2: Time 'late' is not a number"):
        load_dataset({"name": "y", "format": "yoochoose", "path": str(tmp_path)})


# ------------------------------------------------------------------------------------------------ common errors

def test_missing_folder_and_format_detection_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset({"name": "x", "format": "s3rec", "path": str(tmp_path / "nope")})
    with pytest.raises(DataError, match=r"no RecBole training file \(\*\.train\.inter\) found"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path)})
    gz = tmp_path / "broken_test.tsv"
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(b"abc")
    _write(gz, "session_prefix\ttarget\n")
    _write(tmp_path / "broken_train.tsv", "session_prefix\ttarget\n1\t2\n")
    with pytest.raises(DataError, match=r"broken_test\.tsv: header only"):
        load_dataset({"name": "x", "format": "session_tsv", "path": str(tmp_path)})


# ------------------------------------------------------------------------------------------------ export

def test_export_recbole_round_trip(tmp_path):
    ds = load_dataset({"name": "x", "format": "recbole_atomic", "path": str(_recbole(tmp_path / "in")),
                       "options": {"feature_dim": 2}})
    info = export_recbole(ds, tmp_path / "out")
    assert info["mode"] == "leave_one_out"
    seqs = read_recbole_inter(info["inter"])
    index = ds.items.index()
    for u, tr, vt, tt in zip(ds.train_users, ds.train, ds.valid.targets, ds.test.targets):
        assert [index[i] for i in seqs[u]] == [*tr.tolist(), int(vt), int(tt)]
    item_lines = Path(info["item"]).read_text().splitlines()
    assert item_lines[0] == "item_id:token\ttext:token_seq"
    assert item_lines[1] == "A\talpha"


def test_export_real_beauty_round_trip(tmp_path):
    ds = _real("amazon2014-beauty")
    info = export_recbole(ds, tmp_path)
    assert info["mode"] == "leave_one_out" and info["interactions"] == 198502
    seqs = read_recbole_inter(info["inter"])
    index = ds.items.index()
    for j in (0, 100, len(ds.train) - 1):
        u = ds.train_users[j]
        assert [index[i] for i in seqs[u]] == [*ds.train[j].tolist(), int(ds.valid.targets[j]),
                                               int(ds.test.targets[j])]


def test_export_session_dataset(tmp_path):
    rows = ["1\t2", "1 2\t3", "5\t6", "5 6\t7"]
    _write(tmp_path / "in" / "t_train.tsv", "session_prefix\ttarget\n" + "\n".join(rows) + "\n")
    _write(tmp_path / "in" / "t_test.tsv", "session_prefix\ttarget\n1\t3\n1 3\t7\n")
    ds = load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path / "in"),
                       "options": {"valid_fraction": 0.5}})
    info = export_recbole(ds, tmp_path / "out")
    assert info["mode"] == "sessions"
    seqs = read_recbole_inter(info["inter"])
    assert seqs["train-0"] == ["1", "2", "3"] and seqs["valid-1"] == ["5", "6", "7"]
    assert seqs["test-1"] == ["1", "3", "7"] and "test-0" not in seqs


# ------------------------------------------------------------------------------------------------ the row helper

def test_io_rows_numbering_blank_lines_and_decoding(tmp_path):
    from distillrec.data.dataset import LoadReport
    from distillrec.data.loaders._io import TextRows, iter_lines

    p = tmp_path / "a.tsv"
    p.write_bytes("\ufeffh1\th2\r\n1\t2\r\n\n  \n3\t4\n".encode())
    report = LoadReport()
    rows = TextRows(p, "\t", header=True, report=report)
    assert rows.header_line == "h1\th2" and rows.columns(["h1", "h2"]) == {"h1": 0, "h2": 1}
    assert list(rows) == [(2, ["1", "2"]), (5, ["3", "4"])]
    assert report.skipped == {"blank lines in a.tsv (ignored)": 2}
    with gzip.open(tmp_path / "b.tsv.gz", "wb") as f:
        f.write(b"x y\n\nz\n")
    assert list(TextRows(tmp_path / "b.tsv.gz", None)) == [(1, ["x", "y"]), (3, ["z"])]
    assert [n for n, _ in iter_lines(tmp_path / "b.tsv.gz", skip_blank=False)] == [1, 2, 3]
    (tmp_path / "c.txt").write_bytes(b"ok\nok\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"c\.txt, line 3: not valid UTF-8"):
        list(iter_lines(tmp_path / "c.txt"))
    (tmp_path / "d.txt").write_bytes(b"\n \n")
    with pytest.raises(DataError, match=r"d\.txt: the file is empty"):
        TextRows(tmp_path / "d.txt", header=True)


def test_blank_lines_are_counted_in_the_report(tmp_path):
    _recbole(tmp_path, "\n")
    ds = load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})
    assert ds.report.skipped["blank lines in S.train.inter (ignored)"] == 1
    assert [s.tolist() for s in ds.train] == [[1, 2, 3], [4, 1]]


# ------------------------------------------------------------------------------------------------ loader options

def test_mistyped_loader_option_names_it_and_lists_the_valid_ones(tmp_path):
    from distillrec.data.loaders import validate_loader_options

    _write(tmp_path / "Toy.txt", "1 1 2 3\n")
    with pytest.raises(DataError, match=r"option 'stemm' is not an option of format 's3rec'; did you mean 'stem'\? "
                                        r"the options of 's3rec' are: stem \(default None\), meta"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path), "options": {"stemm": "Toy"}})
    # at config-read time, by known name or by format, before anything is read
    with pytest.raises(DataError, match=r"'stemm'.*stem \(default None\)"):
        validate_loader_options("amazon2014-beauty", {"stemm": "Beauty"})
    with pytest.raises(DataError, match=r"option valid_fraction='a lot' of format 'session_tsv': expected a number"):
        validate_loader_options("session_tsv", {"valid_fraction": "a lot"})
    with pytest.raises(DataError, match=r"option 'path': give the path as dataset\.path"):
        validate_loader_options("s3rec", {"path": "x"})
    with pytest.raises(DataError, match=r"'nope' is not a known name or format; known names: .*formats: "):
        validate_loader_options("nope", {})
    assert validate_loader_options("amazon2014-beauty", {"stem": "Beauty", "item2attributes": False}) is None
    assert validate_loader_options("session_tsv", {"valid_fraction": 0, "augmented": "auto"}) is None


# ------------------------------------------------------------------------------------------------ item2attributes

def test_s3rec_item2attributes_become_a_multi_hot_feature(tmp_path):
    _write(tmp_path / "Toy.txt", "1 1 2 3 4\n2 2 3 1\n")
    _write(tmp_path / "Toy_item2attributes.json", '{"1": [10, 20], "2": [20, 20], "3": [50], "9": [10]}')
    ds = load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})
    f = ds.items.features["attributes_onehot"]
    assert f.dtype == np.float32 and f.shape == (5, 3)  # padding row + 4 items; attribute ids 10, 20, 50
    assert f.tolist() == [[0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert ds.report.skipped["Toy_item2attributes.json: attribute entries for item ids not in any sequence "
                             "(ignored)"] == 1
    assert any("attributes_onehot" in n and "3 of 4 items" in n for n in ds.report.notes)
    off = load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path),
                        "options": {"item2attributes": False}})
    assert "attributes_onehot" not in off.items.features
    _write(tmp_path / "Toy_item2attributes.json", '{"1": [10],\n "2": [20,]}')
    with pytest.raises(DataError, match=r"Toy_item2attributes\.json, line 2: not valid JSON"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})
    _write(tmp_path / "Toy_item2attributes.json", '{"1": [10, "red"]}')
    with pytest.raises(DataError, match=r"Toy_item2attributes\.json: item '1': attribute 'red' is not an integer"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})


def test_real_beauty_item2attributes():
    import json

    ds = _real("amazon2014-beauty")
    raw = json.loads((data_root() / "amazon2014-beauty" / "Beauty_item2attributes.json").read_text())
    f = ds.items.features["attributes_onehot"]
    assert f.shape == (12102, 637) and not f[0].any()
    for k in (1, 4, 12101):  # S3-Rec attribute ids 1..637: column j - 1 = attribute j
        assert np.flatnonzero(f[k]).tolist() == sorted(a - 1 for a in set(raw[str(k)]))


# ------------------------------------------------------------------------------------------------ huge / negative ids

class _capped_memory:
    """Cap the address space at its current size + 1 GiB (Linux), so a loader that allocates by id fails fast."""

    def __enter__(self):
        self.old = None
        try:
            import resource

            pages = int(Path("/proc/self/statm").read_text().split()[0])
            self.old = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + 2**30, self.old[1]))
        except (ImportError, OSError, ValueError):
            self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self.old)


HUGE = 9_999_999_999


def test_huge_or_negative_index_in_atomic_file(tmp_path):
    _recbole(tmp_path)
    for name in ("S.item2index", "S.user2index", "S.text", "S.feat1CLS"):
        (tmp_path / name).unlink()
    h = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    train = tmp_path / "S.train.inter"
    train.write_text(h + "0\t0 1\t2\n0\t0\t1\n1\t3\t" + str(HUGE) + "\n")
    with _capped_memory(), pytest.raises(DataError, match=rf"S\.train\.inter, line 4: item index {HUGE} is far "
                                                          r"beyond the \d+ distinct ids"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path)})
    train.write_text(h + "0\t0 1\t2\n0\t0 -1\t1\n")
    with pytest.raises(DataError, match=r"S\.train\.inter, line 3: item index -1 is negative"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path)})
    train.write_text(h + "0\t0 1\t2\n0\t0\t1\n1\t3\t0\n")  # valid again: indices are the items
    ds = load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path)})
    assert ds.items.ids == ["0", "1", "2", "3"] and ds.train[0].tolist() == [1, 2, 3]


def test_item2index_error_names_the_line(tmp_path):
    _recbole(tmp_path)
    _write(tmp_path / "S.item2index", "A\t0\nB\t7\nC\t2\nD\t3\n")
    with pytest.raises(DataError, match=r"S\.item2index, line 2: index 7; the indices run 0\.\.7 for 4 rows"):
        load_dataset({"name": "x", "format": "recbole_atomic", "path": str(tmp_path), "options": {"feature_dim": 2}})


def test_huge_id_in_session_tsv_is_mapped_not_allocated(tmp_path):
    _write(tmp_path / "toy_train.tsv", f"session_prefix\ttarget\n1 2\t3\n4\t{HUGE}\n2 3\t1\n5\t4\n")
    _write(tmp_path / "toy_test.tsv", f"session_prefix\ttarget\n1\t{HUGE}\n")
    with _capped_memory():
        ds = load_dataset({"name": "t", "format": "session_tsv", "path": str(tmp_path),
                           "options": {"valid_fraction": 0}})
    assert ds.n_items == 6 and ds.items.ids == ["1", "2", "3", "4", "5", str(HUGE)]
    assert [s.tolist() for s in ds.train] == [[1, 2, 3], [4, 6], [2, 3, 1], [5, 4]]
    assert ds.test.targets.tolist() == [6]
    assert any("sparse" in n and str(HUGE) in n for n in ds.report.notes)


def test_huge_id_in_s3rec_file(tmp_path):
    _write(tmp_path / "Toy.txt", f"1 1 2 3\n2 2 {HUGE} 1\n")
    with _capped_memory(), pytest.raises(DataError, match=rf"Toy\.txt, line 2: item id {HUGE} is far beyond the 4 "
                                                          r"distinct ids.*renumber"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})
    _write(tmp_path / "Toy.txt", "1 1 2 3\n2 2 99999999999999999999 1\n")  # beyond int64
    with pytest.raises(DataError, match=r"Toy\.txt, line 2: item list 99999999999999999999 is too large for an id"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})


def test_id_beyond_int64_in_microlens(tmp_path):
    _write(tmp_path / "ML_pairs.tsv", "u1\t10 20 30\nu2\t20 99999999999999999999 30\n")
    with pytest.raises(DataError, match=r"ML_pairs\.tsv, line 2: item list 99999999999999999999 is too large"):
        load_dataset({"name": "m", "format": "microlens", "path": str(tmp_path)})


def test_s3rec_meta_short_row(tmp_path):
    _write(tmp_path / "Toy.txt", "1 1 2 3\n")
    _write(tmp_path / "toy_item_meta.tsv", "asin\titem_id\nA1\t1\nA2\n")
    with pytest.raises(DataError, match=r"toy_item_meta\.tsv, line 3: 1 tab-separated column\(s\)"):
        load_dataset({"name": "toy", "format": "s3rec", "path": str(tmp_path)})
