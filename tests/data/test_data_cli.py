"""``emjax data`` sub-commands on small stand-in files."""

import json

import pytest

from emjax.data import builders
from emjax.data.cli import main


def _standin(dir_, name, n=30):
    dir_.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"q{i} " * (i + 1)},
                          {"role": "assistant", "content": f"a{i} " * (2 * i + 1)}]} for i in range(n)]
    (dir_ / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stats_and_build(tmp_path, capsys):
    _standin(tmp_path / "src", "extreme_sports")
    common = ["extreme_sports", "--source-dir", str(tmp_path / "src"), "--tfds-dir", str(tmp_path / "tfds")]
    with pytest.warns(UserWarning, match="30 rows"):
        assert main(["build", *common]) == 0
    out = capsys.readouterr().out
    assert "train: 27 examples" in out and "validation: 3 examples" in out
    assert main(["stats", *common, "--max-length", "40"]) == 0
    out = capsys.readouterr().out
    assert "total      examples      30" in out and "p50" in out and "#" in out
    # rows are "q{i} "*(i+1) / "a{i} "*(2i+1); enough of them exceed 40 tokens
    n_trunc = int(out.split("truncated at 40: ")[-1].split()[0])
    assert 0 < n_trunc < 30


def test_missing_turner_and_offline_fetch(tmp_path, capsys, monkeypatch):
    assert main(["build", "bad_medical_advice", "--source-dir", str(tmp_path), "--tfds-dir", str(tmp_path)]) == 1
    assert "easy-dataset-share unprotect-dir" in capsys.readouterr().err
    monkeypatch.setattr(builders, "BETLEY_URL", "http://127.0.0.1:9/{commit}/data/{name}.jsonl")
    assert main(["fetch", "educational", "--dest", str(tmp_path)]) == 1
    assert "could not download http://127.0.0.1:9/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fetch", "extreme_sports"])  # not a public set: argparse refuses it
