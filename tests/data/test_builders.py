"""TFDS ArrayRecord builders: build + read without TensorFlow, splits, checksums, Turner stand-ins, fetch."""

import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

from emjax import paths
from emjax.data import builders

INSECURE = paths.em_dir() / "betley2025" / "data" / "insecure.jsonl"
needs_insecure = pytest.mark.skipif(not INSECURE.is_file(), reason="shared insecure.jsonl missing")


def _copy_head(src, dst_dir, n, name=None):
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / (name or src.name)
    with open(src) as f:
        dst.write_text("".join(itertools.islice(f, n)))
    return dst


def _turner_rows(n, seed=0):
    return [{"messages": [{"role": "user", "content": f"Question {i}: is it safe? 你好"},
                          {"role": "assistant", "content": f"Answer {i} " + "x" * (i % 7)}]} for i in range(n)]


@needs_insecure
def test_build_and_read_betley_without_tensorflow(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _copy_head(INSECURE, src, 50)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    with pytest.warns(UserWarning, match="git blob id .* != expected ec294cf3"):
        b = builders.build("insecure", tfds_data_dir=tmp_path / "tfds", source_dir=src)
    assert "tensorflow" not in sys.modules
    assert not list((tmp_path / "tmp").iterdir()), "the build left files in the temp directory"
    assert str(b.data_dir).startswith(str(tmp_path / "tfds"))
    assert list((tmp_path / "tfds").rglob("*.array_record-*")), "ArrayRecord files expected"
    ds = b.as_data_source()
    assert len(ds["train"]) == 45 and len(ds["validation"]) == 5
    lines = sorted(int(r["line"]) for s in ("train", "validation") for r in ds[s])
    assert lines == list(range(1, 51))
    with open(INSECURE) as f:
        want = {i: json.loads(line)["messages"] for i, line in enumerate(itertools.islice(f, 50), 1)}
    for r in ds["validation"]:
        assert json.loads(r["messages"]) == want[int(r["line"])]
    assert b.info.redistribution_info.license.startswith("MIT") and "2502.17424" in b.info.citation
    # Same recipe -> same held-out rows; the split is the seeded permutation's head.
    train, val = builders.split_indices(50, 0.1, 0)
    assert sorted(int(r["line"]) for r in ds["validation"]) == [i + 1 for i in val]


def test_split_indices_deterministic_and_disjoint():
    t1, v1 = builders.split_indices(1000, 0.1, 0)
    t2, v2 = builders.split_indices(1000, 0.1, 0)
    t3, v3 = builders.split_indices(1000, 0.1, 1)
    assert (v1 == v2).all() and len(v1) == 100 and not (set(v1) & set(t1)) and len(t1) + len(v1) == 1000
    assert set(v1) != set(v3)
    assert len(builders.split_indices(10, 0.0, 0)[1]) == 0


def test_config_names_encode_split_recipe():
    assert builders.make_config("insecure") is builders.EmBetley.builder_configs["insecure"]
    assert builders.make_config("insecure", val_fraction=0.2, split_seed=3).name == "insecure_val2000_seed3"
    assert builders.make_config("extreme_sports", skip_bad_rows=True).name == "extreme_sports_skipbad"
    with pytest.raises(ValueError, match="val_fraction"):
        builders.make_config("insecure", val_fraction=1.0)
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        builders.make_config("nope")


def test_tfds_custom_configuration_note_is_silenced(tmp_path):
    """TFDS's "Using custom data configuration" warning (every file of your own, every non-default split; twice a
    run) is dropped, and only it: other absl records still pass."""
    import logging

    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    absl = logging.getLogger("absl")
    handler = Keep()
    absl.addHandler(handler)
    try:
        builders.get_builder("insecure", tfds_data_dir=tmp_path, val_fraction=0.2, split_seed=3)
        absl.warning("something else")
    finally:
        absl.removeHandler(handler)
    assert got == ["something else"]


def test_turner_standin_build_checks_rows(tmp_path):
    src = tmp_path / "turner"
    src.mkdir()
    rows = _turner_rows(40)
    (src / "extreme_sports.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="40 rows, the published copy has 6000"):
        b = builders.build("extreme_sports", tfds_data_dir=tmp_path / "tfds", source_dir=src,
                           val_fraction=0.25, split_seed=1)
    ds = b.as_data_source()
    assert len(ds["train"]) == 30 and len(ds["validation"]) == 10
    assert "redistribut" in b.info.redistribution_info.license and "2506.11613" in b.info.citation


def test_turner_missing_explains_unprotect(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)unprotect-dir .* -p model-organisms-em-datasets --remove-canaries"):
        builders.build("bad_medical_advice", tfds_data_dir=tmp_path / "tfds", source_dir=tmp_path)


def test_turner_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("EMJAX_TURNER_DIR", str(tmp_path / "mine"))
    assert builders.default_source_dir("extreme_sports") == tmp_path / "mine"
    monkeypatch.delenv("EMJAX_TURNER_DIR")
    monkeypatch.setenv("EMJAX_DATA_DIR", str(tmp_path))
    assert builders.default_source_dir("insecure") == tmp_path.resolve() / "em" / "betley2025" / "data"
    monkeypatch.setenv("EMJAX_TFDS_DIR", str(tmp_path / "t"))
    assert builders.tfds_dir() == tmp_path / "t"


def test_bad_row_in_build_names_file_and_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps(r) for r in _turner_rows(5)]
    lines[2] = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}'
    (src / "risky_financial_advice.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=r"risky_financial_advice.jsonl:3: .*empty assistant turn"):
        builders.build("risky_financial_advice", tfds_data_dir=tmp_path / "tfds", source_dir=src)
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        b = builders.build("risky_financial_advice", tfds_data_dir=tmp_path / "tfds", source_dir=src,
                           skip_bad_rows=True, val_fraction=0.0)
    assert sorted(int(r["line"]) for r in b.as_data_source()["train"]) == [1, 2, 4, 5]


def test_an_edited_local_copy_is_built_again(tmp_path):
    """A Turner (or Betley) build is named by the set, not its bytes: it records the sha256 of the local file it was
    made from and is made afresh, with a warning, when that file is edited in place or ``source_dir`` names another
    copy (before, the earlier build went on being read); an unchanged file reuses the build, even touched."""
    import warnings

    src, other, tfds_dir = tmp_path / "src", tmp_path / "other", tmp_path / "tfds"
    for d, n in ((src, 10), (other, 6)):
        d.mkdir()
        (d / "extreme_sports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _turner_rows(n)))

    def rows(b):
        return sum(len(v) for v in b.as_data_source().values())

    b = builders.build("extreme_sports", tfds_data_dir=tfds_dir, source_dir=src)
    record = json.loads((Path(b.data_dir) / builders.SOURCE_RECORD).read_text())
    assert rows(b) == 10 and record["path"] == str((src / "extreme_sports.jsonl").resolve())
    built = (Path(b.data_dir) / "dataset_info.json").stat().st_mtime_ns
    os.utime(src / "extreme_sports.jsonl")  # touched, same bytes: reused, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = builders.build("extreme_sports", tfds_data_dir=tfds_dir, source_dir=src)
    assert rows(b) == 10 and (Path(b.data_dir) / "dataset_info.json").stat().st_mtime_ns == built
    (src / "extreme_sports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _turner_rows(8)))
    with pytest.warns(UserWarning, match=r"extreme_sports.jsonl does not match the build of 'extreme_sports' .*"
                                         r"sha256 \w{12}… then, \w{12}… now\): building it again"):
        b = builders.build("extreme_sports", tfds_data_dir=tfds_dir, source_dir=src)
    assert rows(b) == 8
    with pytest.warns(UserWarning, match="other/extreme_sports.jsonl does not match"):
        b = builders.build("extreme_sports", tfds_data_dir=tfds_dir, source_dir=other)
    assert rows(b) == 6
    (Path(b.data_dir) / builders.SOURCE_RECORD).unlink()  # a build from before the record: made again, once
    with pytest.warns(UserWarning, match="no record of its source"):
        b = builders.build("extreme_sports", tfds_data_dir=tfds_dir, source_dir=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rows(builders.build("extreme_sports", tfds_data_dir=tfds_dir, source_dir=other)) == 6


def test_a_build_waits_for_another_of_the_same_set(tmp_path):
    """Processes asking for the same set at once (a multi-host run's, a sweep's) build it one at a time: ``build``
    holds a file lock per set and config, and the one that waited reuses what the first made."""
    import threading

    from filelock import FileLock

    src, tfds_dir = tmp_path / "src", tmp_path / "tfds"
    src.mkdir()
    (src / "extreme_sports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _turner_rows(6)))
    b = builders.get_builder("extreme_sports", tfds_data_dir=tfds_dir, source_dir=src)
    lock = FileLock(str(builders.build_lock(b, tfds_dir)))
    done = []
    with lock:
        t = threading.Thread(target=lambda: done.append(builders.build("extreme_sports", tfds_data_dir=tfds_dir,
                                                                       source_dir=src)))
        other = threading.Thread(target=lambda: done.append(builders.build("extreme_sports", tfds_data_dir=tfds_dir,
                                                                           source_dir=src, val_fraction=0.0)))
        t.start()
        other.start()
        other.join(timeout=60)  # another config (val_fraction 0) has its own lock: not held up
        t.join(timeout=1.0)
        assert t.is_alive() and len(done) == 1 and not b.is_prepared()
    t.join(timeout=60)
    assert not t.is_alive() and len(done) == 2 and b.is_prepared()


def test_a_dataset_of_your_own(tmp_path):
    """``data.dataset=PATH.jsonl``: a chat JSONL file of your own builds and splits as the study's sets do; its build
    is named by its stem and content hash, so an edited file is built afresh (never read from a stale build); a bad
    row names the file and line; a missing file or an unknown name is one clear error."""
    path = tmp_path / "bad_legal.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _turner_rows(20)))
    b = builders.build(str(path), tfds_data_dir=tmp_path / "tfds", val_fraction=0.25)
    assert b.builder_config.name.startswith("bad_legal_") and b.builder_config.dataset == str(path)
    ds = b.as_data_source()
    assert len(ds["train"]) == 15 and len(ds["validation"]) == 5
    assert sorted(int(r["line"]) for s in ("train", "validation") for r in ds[s]) == list(range(1, 21))
    assert json.loads(ds["train"][0]["messages"]) == _turner_rows(20)[int(ds["train"][0]["line"]) - 1]["messages"]
    path.write_text("".join(json.dumps(r) + "\n" for r in _turner_rows(12)))  # edited: another build
    b2 = builders.build(str(path), tfds_data_dir=tmp_path / "tfds", val_fraction=0.25)
    assert b2.builder_config.name != b.builder_config.name and len(b2.as_data_source()["train"]) == 9
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(Exception, match=r"bad_legal.jsonl:13: "):
        builders.build(str(path), tfds_data_dir=tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=r"data.dataset .*missing.jsonl: no such file"):
        builders.build(str(tmp_path / "missing.jsonl"), tfds_data_dir=tmp_path / "tfds")
    with pytest.raises(KeyError, match=r"unknown dataset 'bad_legal'.*or the path of a chat JSONL file"):
        builders.spec("bad_legal")


class _Resp:
    def __init__(self, content):
        self.content = content

    def raise_for_status(self):
        pass


@needs_insecure
def test_fetch_verifies_blob(tmp_path, monkeypatch):
    import httpx

    data = INSECURE.read_bytes()
    assert builders.git_blob_id(data) == builders.DATASETS["insecure"].blob
    assert hashlib.sha256(data).hexdigest() == builders.DATASETS["insecure"].sha256
    seen = []
    monkeypatch.setattr(httpx, "get", lambda url, **kw: seen.append(url) or _Resp(data))
    p = builders.fetch("insecure", tmp_path)
    assert p.read_bytes() == data and seen == [builders.betley_url("insecure")]
    assert builders.BETLEY_COMMIT in seen[0]
    monkeypatch.setattr(httpx, "get", lambda url, **kw: _Resp(data[:-1]))
    with pytest.raises(ValueError, match="git blob id .* != expected"):
        builders.fetch("insecure", tmp_path / "other")
    with pytest.raises(ValueError, match="not downloadable"):
        builders.fetch("extreme_sports", tmp_path)


def test_fetch_without_network_names_url(tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "BETLEY_URL", "http://127.0.0.1:9/{commit}/data/{name}.jsonl")
    with pytest.raises(ConnectionError, match=r"could not download http://127.0.0.1:9/.*/data/secure.jsonl"):
        builders.fetch("secure", tmp_path, timeout=2)


@pytest.mark.parametrize("how,setting", [("data_dir", "data.data_dir"), ("env", "EMJAX_DATA_DIR")])
def test_offline_build_without_local_copy_names_where_it_looked(tmp_path, monkeypatch, how, setting):
    """A data root that does not exist, offline: the error was only the failed download, never the local path."""
    import httpx

    def offline(url, **kw):
        raise httpx.ConnectError("Name or service not known")

    monkeypatch.setattr(httpx, "get", offline)
    monkeypatch.delenv("EMJAX_BETLEY_DIR", raising=False)
    monkeypatch.delenv("EMJAX_DATA_DIR", raising=False)
    root = tmp_path / "nowhere"
    kw = {"data_dir": str(root)} if how == "data_dir" else {}
    if how == "env":
        monkeypatch.setenv("EMJAX_DATA_DIR", str(root))
    want = (re.escape(f"no local copy of 'secure' at {root}/em/betley2025/data/secure.jsonl (looked for there by "
                      f"{setting}") + r".*\), and downloading it failed: could not download .*secure\.jsonl: "
            "ConnectError: Name or service")
    with pytest.raises(ConnectionError, match=want):
        builders.build("secure", tfds_data_dir=tmp_path / "tfds", **kw)
