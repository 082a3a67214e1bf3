"""emjax.paths: data locations and the atomic writer every results file goes through."""

import os

import pytest

from emjax import paths


def test_data_dir_override_order(monkeypatch, tmp_path):
    monkeypatch.setenv("EMJAX_DATA_DIR", str(tmp_path / "env"))
    assert paths.data_dir() == (tmp_path / "env").resolve()
    assert paths.data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()  # an argument beats the environment
    assert paths.em_dir(tmp_path) == tmp_path.resolve() / "em"
    monkeypatch.delenv("EMJAX_DATA_DIR")
    assert paths.data_dir() == (paths.PROJECT_ROOT.parent / "shared" / "data").resolve()


def test_write_atomic_text_and_bytes(tmp_path):
    p = tmp_path / "final.json"
    assert paths.write_atomic(p, '{"a": 1}') == p and p.read_text() == '{"a": 1}'
    paths.write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["final.json"]  # no temporary left behind


def test_write_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "summary.json"
    p.write_text("old")

    def boom(src, dst):
        assert open(src).read() == "new" and open(dst).read() == "old"  # the new text is complete before the swap
        raise OSError("disk gone")

    monkeypatch.setattr(paths.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        paths.write_atomic(p, "new")
    assert p.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["summary.json"]
