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
    """User errors are one line and exit status 2, as in every emjax command (they were 1, and an offline build of a
    public set, or an empty file, a traceback)."""
    assert main(["build", "bad_medical_advice", "--source-dir", str(tmp_path), "--tfds-dir", str(tmp_path)]) == 2
    assert "easy-dataset-share unprotect-dir" in capsys.readouterr().err
    monkeypatch.setattr(builders, "BETLEY_URL", "http://127.0.0.1:9/{commit}/data/{name}.jsonl")
    assert main(["fetch", "educational", "--dest", str(tmp_path)]) == 2
    assert "could not download http://127.0.0.1:9/" in capsys.readouterr().err
    assert main(["build", "educational", "--source-dir", str(tmp_path), "--tfds-dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert (f"emjax data build: ConnectionError: no local copy of 'educational' at {tmp_path / 'educational.jsonl'} "
            "(looked for there by data.source_dir / --source-dir), and downloading it failed: could not download "
            "http://127.0.0.1:9/") in err and "Traceback" not in err
    empty, latin = tmp_path / "empty.jsonl", tmp_path / "latin.jsonl"
    empty.write_text("\n\n")
    _standin(tmp_path, "latin", n=3)
    latin.write_bytes(latin.read_bytes().replace(b"a1 ", "\u00e91 ".encode("latin-1"), 1))
    for path, want in ((empty, "empty.jsonl: no rows (a chat JSONL file has one"),
                       (latin, "latin.jsonl:2: not UTF-8 text (byte 0xe9 at column")):
        assert main(["stats", str(path), "--tfds-dir", str(tmp_path / "t")]) == 2
        assert want in capsys.readouterr().err
    assert main(["stats", "insecure", "--max-length", "0"]) == 2
    assert "--max-length 0: must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fetch", "extreme_sports"])  # not a public set: argparse refuses it


def test_histogram_bins_are_whole_tokens():
    """Each bin holds whole token lengths and is labelled by them (short sets had repeated labels like 25-25)."""
    import numpy as np

    from emjax.data.cli import text_histogram

    for lengths in (np.array([25, 25, 26, 27, 30]), np.arange(100, 1000), np.array([7])):
        rows = [line.split() for line in text_histogram(lengths).splitlines()]
        labels = [r[0] for r in rows]
        assert len(set(labels)) == len(labels) and sum(int(r[1]) for r in rows) == len(lengths)
        spans = [tuple(map(int, lab.split("-"))) if "-" in lab else (int(lab), int(lab)) for lab in labels]
        assert spans[0][0] == lengths.min() and spans[-1][1] == lengths.max()
        assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
