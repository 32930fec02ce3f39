"""Reading app: per-reader offline pages (self-contained, escaped, own orders) and the coordinator's merge checks."""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from test_bundle import export_tiny, make_tiny_study, model_args

from cldlr.cli import main
from cldlr.common.errors import CldlrError
from cldlr.simulations.reader_app.merge import ReadsFileError, merge_reads
from cldlr.simulations.reader_app.page import (
    AppOptions,
    build_reader_apps,
    case_section,
    render_reader_app,
    script_json,
    unlock_hash,
)
from cldlr.simulations.reader_packet import READ_COLUMNS, parse_readers

DATA_JSON = re.compile(r'<script type="application/json" id="study-data">(.*?)</script>', re.S)
SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def study_data(page: str) -> dict:
    return json.loads(DATA_JSON.search(page).group(1))


@pytest.fixture(scope="module")
def app_packet(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    study = make_tiny_study(root, n_patients=16)
    bundle = export_tiny(study, root / "bundle")
    out = root / "packet"
    assert main(["reader-study", "packet", *model_args(bundle), "--site", str(study.site.root), "--out", str(out),
                 "--seed", "3", "--readers", "R01,R02,R03", "--washout-days", "14", "--show-round1"]) == 0
    return study, bundle, out


def test_reader_pages_are_self_contained_de_identified_and_locked_down(app_packet):
    study, _, out = app_packet
    key = pd.read_csv(out / "key.csv")
    assert sorted(p.name for p in (out / "readers").iterdir()) == ["R01.html", "R02.html", "R03.html"]
    for reader in ("R01", "R02", "R03"):
        page = (out / "readers" / f"{reader}.html").read_text()
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
        for image_id, patient in zip(study.site.frame["image_id"], study.site.frame["patient_id"]):
            assert image_id not in page and str(patient) not in text
        assert str(study.site.root) not in page
        assert not re.search(r"""(src|href|action)\s*=\s*["'](?!data:)""", page)
        assert "http:" not in page and "https:" not in page and "@import" not in page
        csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
        assert "default-src 'none'" in csp and "connect-src 'none'" in csp and "img-src data:" in csp
        scripts = SCRIPT.findall(page)
        assert len(scripts) == 1  # the only script that runs; the policy names its hash
        digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in csp
        uris = re.findall(r'src="data:image/png;base64,', page)
        assert len(uris) == 3 * len(key)  # B-mode, ROI, heat map once per case
        data = study_data(page)
        assert data["reader"] == reader and data["washout_days"] == 14 and data["show_round1"] is True
        for r in ("1", "2"):
            assert sorted(data["orders"][r]) == sorted(key["case"])
        assert data["orders"]["1"] != data["orders"]["2"]
        assert set(re.findall(r'data-case="([^"]+)"', page)) == set(key["case"])


def test_each_reader_has_an_own_recorded_order_and_code(app_packet):
    _, _, out = app_packet
    orders = pd.read_csv(out / "orders.csv")
    codes = dict(pd.read_csv(out / "unlock_codes.csv").values)
    seen = set()
    for reader in ("R01", "R02", "R03"):
        data = study_data((out / "readers" / f"{reader}.html").read_text())
        for r in (1, 2):
            rows = orders[(orders["reader"] == reader) & (orders["round"] == r)].sort_values("position")
            assert list(rows["case"]) == data["orders"][str(r)]
            seen.add(tuple(rows["case"]))
        assert data["unlock_hash"] == unlock_hash(data["study"], reader, codes[reader])
        assert data["unlock_hash"] != unlock_hash(data["study"], reader, "WRONG-CODE1")
        assert codes[reader] not in (out / "readers" / f"{reader}.html").read_text()
    assert len(seen) == 6  # six different orders


def test_orders_depend_on_seed_and_reader_only(app_packet, tmp_path):
    study, bundle, out = app_packet
    again = tmp_path / "again"
    assert main(["reader-study", "packet", *model_args(bundle), "--site", str(study.site.root), "--out", str(again),
                 "--seed", "3", "--readers", "R02"]) == 0
    first = study_data((out / "readers" / "R02.html").read_text())
    assert study_data((again / "readers" / "R02.html").read_text())["orders"] == first["orders"]
    assert (again / "key.csv").read_text() == (out / "key.csv").read_text()
    assert list(pd.read_csv(again / "reads_template.csv").columns) == list(READ_COLUMNS)


def test_names_cannot_break_out_of_the_page():
    hostile = '</script><script>alert(1)</script><!--'
    text = script_json({"x": hostile, "y": "a\u2028b&c"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"x": hostile, "y": "a\u2028b&c"}
    section = case_section('"><img src=x onerror=alert(1)>', "<figure></figure>", "")
    assert 'data-case="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in section
    page = render_reader_app(study=hostile, reader="R01", created="2026-01-01T00:00:00+00:00", bundle_id="b" * 64,
                             sections=[section], orders={1: [hostile], 2: [hostile]}, options=AppOptions())
    assert len(SCRIPT.findall(page)) == 1 and "<script>alert" not in page
    assert study_data(page)["study"] == hostile and study_data(page)["orders"]["1"] == [hostile]
    with pytest.raises(CldlrError, match="reader id"):
        render_reader_app(study="S", reader="../x", created="", bundle_id="", sections=[], orders={1: [], 2: []},
                          options=AppOptions())


def test_reader_ids_are_parsed_and_checked():
    assert parse_readers("3") == ["R01", "R02", "R03"] and parse_readers(2) == ["R01", "R02"]
    assert parse_readers("alice, bob.k") == ["alice", "bob.k"]
    for bad in ("0", "a/b", "x y", "=cmd"):
        with pytest.raises(CldlrError):
            parse_readers(bad)
    with pytest.raises(CldlrError, match="twice"):
        build_reader_apps(study="S", readers=["a", "a"], sections={}, seed=0, bundle_id="", options=AppOptions(),
                          created="")


# ---------------------------------------------------------------------------- merge

CASES = [f"C{i:03d}" for i in range(1, 7)]
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@pytest.fixture
def key(tmp_path) -> Path:
    path = tmp_path / "key.csv"
    path.write_text("case,image_id,label\n" + "".join(f"{c},img{i},{i % 2}\n" for i, c in enumerate(CASES)))
    return path


def export(folder: Path, reader: str, *, gap_days: float = 30.0, unlocked_by: str = "washout", rows=None,
           comment: str = "", log: bool = True) -> Path:
    """What the app saves: reads_<study>_<reader>.csv (BOM, CRLF) and its .log.json."""
    if rows is None:
        rows = [[reader, r, c, i % 2, "4b", 20 + 10 * i, "", 12.5, comment] for r in (1, 2) for i, c in enumerate(CASES)]
    buffer = io.StringIO()
    csv.writer(buffer).writerows([list(READ_COLUMNS), *rows])
    path = folder / f"reads_S1_{reader}.csv"
    path.write_text("\ufeff" + buffer.getvalue(), encoding="utf-8")
    done1 = T0 + timedelta(hours=2)
    if log:
        rounds = {"1": {"started": iso(T0), "completed": iso(done1), "unlocked_by": None, "clock_set_back": 0},
                  "2": {"started": iso(done1 + timedelta(days=gap_days)), "completed": None,
                        "unlocked_by": unlocked_by, "clock_set_back": 0}}
        (folder / f"reads_S1_{reader}.log.json").write_text(json.dumps(
            {"study": "S1", "reader": reader, "packet_created": "2026-03-01T00:00:00+00:00", "rounds": rounds}))
    return path


def test_merge_writes_one_checked_file(tmp_path, key, capsys):
    files = [export(tmp_path, "R01", comment="=HYPERLINK(\"x\")"), export(tmp_path, "R02", gap_days=28.5)]
    out = tmp_path / "merged.csv"
    assert main(["reader-study", "merge", *map(str, files), "--key", str(key), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "R02: round 1 finished" in printed and "28.5 days later" in printed
    merged = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(merged.columns) == list(READ_COLUMNS) and len(merged) == 2 * 2 * len(CASES)
    assert merged.groupby(["reader", "round"]).size().tolist() == [len(CASES)] * 4
    assert set(merged[merged["reader"] == "R01"]["comment"]) == {"'=HYPERLINK(\"x\")"}
    with pytest.raises(CldlrError, match="exists"):
        merge_reads(files, key, out)


@pytest.mark.parametrize(("row", "column", "message"), [
    (["R01", 1, "C999", 0, "4a", 10, "", 1, ""], "case", "unknown case"),
    (["R01", 3, "C001", 0, "4a", 10, "", 1, ""], "round", "not 1"),
    (["R01", 1, "C001", 2, "4a", 10, "", 1, ""], "malignant", "not 0"),
    (["R01", 1, "C001", 0, "4d", 10, "", 1, ""], "birads4", "4a, 4b or 4c"),
    (["R01", 1, "C001", 0, "4a", 101, "", 1, ""], "likelihood", "0-100"),
    (["R01", 1, "C001", 0, "4a", 10, "7", 1, ""], "confidence", "1-5"),
    (["R01", 1, "C001", 0, "4a", 10, "", -3, ""], "seconds", ">= 0"),
])
def test_merge_names_file_line_and_column(tmp_path, key, row, column, message):
    good = [["R01", r, c, 0, "4a", 10, "", 1.0, ""] for r in (1, 2) for c in CASES]
    path = export(tmp_path, "R01", rows=[*good, row])
    with pytest.raises(ReadsFileError, match=re.escape(f"{path}:{len(good) + 2}: column '{column}'") + ".*" + message):
        merge_reads([path], key, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_merge_finds_duplicates_gaps_and_strangers(tmp_path, key):
    rows = [["R01", r, c, 0, "4a", 10, "", 1.0, ""] for r in (1, 2) for c in CASES if (r, c) != (2, "C004")]
    a = export(tmp_path, "R01", rows=rows + [rows[0]])
    with pytest.raises(ReadsFileError) as info:
        merge_reads([a], key, tmp_path / "m.csv")
    text = str(info.value)
    assert f"{a}:{len(rows) + 2}: columns 'reader, round, case': reader R01 read case C001 in round 1 twice" in text
    assert "reader R01: round 2 lacks case(s) C004" in text
    b = export(tmp_path, "R02")
    with pytest.raises(ReadsFileError, match="R02 read case C001 in round 1 twice"):
        merge_reads([b, b], key, tmp_path / "m.csv")


def test_merge_checks_the_washout(tmp_path, key):
    short = export(tmp_path, "R01", gap_days=3)
    with pytest.raises(ReadsFileError, match="started round 2 3.0 days after finishing round 1; the wash-out is 28"):
        merge_reads([short], key, tmp_path / "m.csv")
    result = merge_reads([short], key, tmp_path / "m.csv", washout="warn")
    assert any("3.0 days" in w for w in result.warnings)
    assert merge_reads([short], key, tmp_path / "m2.csv", washout_days=2).warnings == []
    coded = export(tmp_path, "R02", gap_days=1, unlocked_by="code")  # the coordinator's code opened round 2
    assert "opened by code" in merge_reads([coded], key, tmp_path / "m3.csv").washout["R02"]
    backwards = export(tmp_path, "R03", gap_days=-1)
    with pytest.raises(ReadsFileError, match="out of order"):
        merge_reads([backwards], key, tmp_path / "m4.csv")
    unlogged = export(tmp_path, "R04", log=False)
    assert "cannot be checked" in merge_reads([unlogged], key, tmp_path / "m5.csv").warnings[0]
