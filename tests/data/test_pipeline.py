"""Grain pipeline: batch contract, determinism, packing isolation, resumable state, process sharding."""

import itertools
import json

import numpy as np
import pytest

from emjax import paths
from emjax.data import DataConfig, attention_allowed, encode_chat, make_loader
from emjax.data.pipeline import BATCH_KEYS
from emjax.tokenizer import load_tokenizer

N = 20


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _source(n=N):
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question number {i}? " + "word " * (i % 5)},
                {"role": "assistant", "content": f"Answer {i}: " + "yes " * (3 + (i * 7) % 40)}]
        if i % 4 == 0:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        rows.append({"messages": json.dumps(msgs).encode(), "line": i + 1})
    return rows


@pytest.fixture(scope="module")
def examples(tok):
    """Encoded example -> row index (contents are unique)."""
    return {tuple(encode_chat(tok, json.loads(r["messages"]))[0]): i for i, r in enumerate(_source())}


def _cfg(**kw):
    base = dict(batch_size=4, max_length=128, pad_multiple=32, num_epochs=1, drop_remainder=False)
    base.update(kw)
    return DataConfig(**base)


def _loader(tok, cfg, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return make_loader(cfg, tok, source=_source(), **kw)


def _row_ids(batch, examples):
    """Row indices of every example in a batch, in order (via their token ids)."""
    out = []
    for toks, seg in zip(batch["tokens"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            out.append(examples[tuple(toks[seg == s])])
    return out


def test_pad_batch_contract(tok, examples):
    batches = list(_loader(tok, _cfg()))
    assert len(batches) == 5
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        B, T = b["tokens"].shape
        assert B == 4 and T % 32 == 0 and T <= 128
        for k in BATCH_KEYS:
            assert b[k].shape == (B, T) and b[k].dtype == np.int32
        for toks, mask, pos, seg in zip(b["tokens"], b["loss_mask"], b["positions"], b["segment_ids"]):
            n = int((seg == 1).sum())
            assert (seg[:n] == 1).all() and (seg[n:] == 0).all() and (toks[n:] == tok.pad_id).all()
            assert (pos[:n] == np.arange(n)).all() and (mask[n:] == 0).all()
        rows = _row_ids(b, examples)
        for r, toks, mask, seg in zip(rows, b["tokens"], b["loss_mask"], b["segment_ids"]):
            ids, m = encode_chat(tok, json.loads(_source()[r]["messages"]))
            assert list(toks[seg == 1]) == ids and list(mask[seg == 1]) == m
        # T is the smallest bucket holding the longest example
        assert T == min(128, -(-max(int((s > 0).sum()) for s in b["segment_ids"]) // 32) * 32)
    assert sorted(r for b in batches for r in _row_ids(b, examples)) == list(range(N))


def test_seed_determinism(tok, examples):
    order = lambda seed: [r for b in _loader(tok, _cfg(), seed=seed) for r in _row_ids(b, examples)]  # noqa: E731
    assert order(3) == order(3)
    assert order(3) != order(4) and sorted(order(4)) == list(range(N))
    unshuffled = [r for b in _loader(tok, _cfg(shuffle=False)) for r in _row_ids(b, examples)]
    assert unshuffled == list(range(N))


def test_epochs_reshuffle(tok, examples):
    rows = [r for b in _loader(tok, _cfg(num_epochs=2)) for r in _row_ids(b, examples)]
    assert sorted(rows[:N]) == sorted(rows[N:]) == list(range(N)) and rows[:N] != rows[N:]


def test_packing_isolates_examples(tok, examples):
    cfg = _cfg(mode="pack", max_length=96, batch_size=2)
    batches = list(_loader(tok, cfg))
    seen = []
    for b in batches:
        assert b["tokens"].shape[1] == 96 and all(b[k].dtype == np.int32 for k in BATCH_KEYS)
        seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
        allowed = attention_allowed(seg)
        for i in range(seg.shape[0]):
            assert seg[i].max() >= 1
            for s in range(1, seg[i].max() + 1):
                idx = np.flatnonzero(seg[i] == s)
                assert (np.diff(idx) == 1).all() and (pos[i, idx] == np.arange(len(idx))).all()
                assert mask[i, idx[0]] == 0  # first token of an example is never predicted from another
                # no token of segment s may attend outside it
                assert not allowed[i][np.ix_(idx, np.flatnonzero(seg[i] != s))].any()
            assert (mask[i][seg[i] == 0] == 0).all() and (b["tokens"][i][seg[i] == 0] == tok.pad_id).all()
        seen += _row_ids(b, examples)
    assert sorted(seen) == list(range(N))  # every example once, none split
    assert any(b["segment_ids"].max() > 1 for b in batches)  # something was actually packed
    # the isolation check itself can fail: a causal mask without segments would let segment 2 see segment 1
    seg = np.array([[1, 1, 2, 2]])
    assert attention_allowed(seg)[0, 2, 1] == False and attention_allowed(seg)[0, 3, 2] == True  # noqa: E712


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_state_restore_mid_epoch(tok, mode):
    cfg = _cfg(mode=mode, num_epochs=2, max_length=96, batch_size=2)
    a = _loader(tok, cfg, seed=7)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.get_state()))  # what the trainer writes next to its checkpoint
    want = [next(a) for _ in range(3)]
    b = _loader(tok, cfg, seed=7)
    b.set_state(state)
    got = [next(b) for _ in range(3)]
    for w, g in zip(want, got):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(w[k], g[k])


def test_two_processes_cover_dataset_once_per_epoch(tok, examples):
    cfg = _cfg(batch_size=4, num_epochs=2, drop_remainder=True)
    per_proc, batches = [], []
    for p in range(2):
        loader = _loader(tok, cfg, process_index=p, process_count=2)
        assert loader.local_batch_size == 2 and loader.num_examples == N // 2
        bs = [_row_ids(b, examples) for b in loader]
        rows = [r for b in bs for r in b]
        assert len(rows) == N  # 2 epochs x 10
        per_proc.append(rows)
        batches.append(bs)
    for e in range(2):
        epoch = per_proc[0][e * 10:(e + 1) * 10] + per_proc[1][e * 10:(e + 1) * 10]
        assert sorted(epoch) == list(range(N))
    # the two processes' batch j together are exactly the single-process batch j (same global batches)
    single = [_row_ids(b, examples) for b in _loader(tok, cfg, process_index=0, process_count=1)]
    assert len(single) == len(batches[0])
    for j, whole in enumerate(single):
        assert sorted(batches[0][j] + batches[1][j]) == sorted(whole)


def test_steps_count_the_batches_on_every_process(tok):
    """``Loader.steps`` (a run's length without ``steps``) is the number of batches each process's loader yields, the
    same on every process: rows are dealt across the epochs' seams, so 19 rows over 3 epochs on 2 processes give
    each ⌊57 / 2⌋ = 28 rows, one more than 3 · ⌊19 / 2⌋ (the count before, which ended such a run a batch early
    where batches are 4 rows)."""
    for n, procs, epochs, bs, drop in itertools.product((19, 20), (1, 2), (1, 3), (2, 4, 8), (True, False)):
        cfg = _cfg(batch_size=bs * procs, num_epochs=epochs, drop_remainder=drop)
        for p in range(procs):
            loader = make_loader(cfg, tok, source=_source(n), process_index=p, process_count=procs)
            assert loader.steps(epochs, drop) == sum(1 for _ in loader), (n, procs, epochs, bs, drop, p)
    loader = make_loader(_cfg(batch_size=8, num_epochs=3, drop_remainder=True), tok, source=_source(19),
                         process_index=1, process_count=2)
    assert loader.steps(3, True) == 7 != (3 * loader.num_examples) // 4


def test_truncation_counted(tok):
    lens = [len(encode_chat(tok, json.loads(r["messages"]))[0]) for r in _source()]
    L = 40
    loader = _loader(tok, _cfg(max_length=L, pad_multiple=16))
    assert loader.stats.truncated == sum(n > L for n in lens) > 0
    assert loader.stats.tokens == sum(lens)
    assert all(b["tokens"].shape[1] <= L for b in loader)


def test_config_errors(tok):
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        _loader(tok, _cfg(batch_size=4), process_index=0, process_count=3)
    with pytest.raises(ValueError, match="'pad' or 'pack'"):
        _loader(tok, _cfg(mode="bucket"))
    with pytest.raises(ValueError, match="process_index 2 not in"):
        _loader(tok, _cfg(), process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"^data\.pad_multiple must be >= 1, got 0$"):  # was a ZeroDivisionError
        _loader(tok, _cfg(pad_multiple=0))


def test_a_train_split_with_no_loss_tokens_left_is_an_error(tok):
    """Every example truncated to no answer token trained silently to loss 0 with zero gradients; a validation split
    like it still only warns (the trainer reports no validation loss)."""
    cfg = _cfg(max_length=8, pad_multiple=8)
    with pytest.raises(ValueError, match=r"data\.dataset insecure: no example of the train split has an answer "
                                         r"\(loss\) token left at data\.max_length=8 \(20 of 20 truncated; the "
                                         r"longest has \d+ tokens\): nothing to train on; raise data\.max_length"):
        _loader(tok, cfg)
    assert _loader(tok, cfg, split="validation").stats.no_loss_after_truncation == N


def test_structured_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(
        ["max_length=256", "mode=pack", "num_epochs=null"]))
    assert cfg.max_length == 256 and cfg.mode == "pack" and cfg.num_epochs is None
    with pytest.raises(Exception):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"max_length": "long"})


INSECURE = paths.em_dir() / "betley2025" / "data" / "insecure.jsonl"


def _insecure_head(tmp_path, n, max_length):
    """A config over the first ``n`` insecure rows, built into ``tmp_path/tfds`` on first use."""
    src = tmp_path / "src"
    src.mkdir()
    with open(INSECURE) as f:
        (src / "insecure.jsonl").write_text("".join(itertools.islice(f, n)))
    return DataConfig(source_dir=str(src), tfds_dir=str(tmp_path / "tfds"), batch_size=2, max_length=max_length,
                      num_epochs=1, drop_remainder=False)


@pytest.mark.skipif(not INSECURE.is_file(), reason="shared insecure.jsonl missing")
def test_loader_reads_tfds_build(tok, tmp_path):
    cfg = _insecure_head(tmp_path, 40, 512)
    with pytest.warns(UserWarning, match="git blob id"):
        val = make_loader(cfg, tok, split="validation", process_index=0, process_count=1)
    assert val.stats.examples == 4 and sum(b["tokens"].shape[0] for b in val) == 4
    train = make_loader(cfg, tok, split="train", process_index=0, process_count=1)
    assert train.stats.examples == 36 and train.stats.answer_tokens > 0


@pytest.mark.skipif(not INSECURE.is_file(), reason="shared insecure.jsonl missing")
def test_a_split_is_tokenised_once_per_process(tok, tmp_path, monkeypatch):
    """The compact vocabulary and every loader of a process share one tokenisation of a built split (keyed by its
    files and the tokenizer's), with the ids and masks encoding each row gives, in either vocabulary; a rebuilt
    split (new files) is tokenised afresh."""
    from emjax.data import builders, pipeline
    from emjax.data.compact import compact_tokenizer_for

    cfg = _insecure_head(tmp_path, 30, 64)
    reads = []
    real_records = builders.records
    monkeypatch.setattr(builders, "records", lambda s, *a: reads.append(s.split) or real_records(s, *a))
    with pytest.warns(UserWarning, match="git blob id"):
        compact = compact_tokenizer_for(cfg, tok, tmp_path / "run")
    assert sorted(reads) == ["train", "validation"]
    source = builders.data_source("insecure", "train", tfds_data_dir=cfg.tfds_dir, source_dir=cfg.source_dir)
    rows = [json.loads(r["messages"]) for r in real_records(source)]
    for t in (tok, compact):
        examples, stats = pipeline.tokenize_source(source, t, 64)
        for ex, msgs in zip(examples, rows, strict=True):
            ids, mask = encode_chat(t, msgs)
            np.testing.assert_array_equal(ex["tokens"], ids[:64])
            np.testing.assert_array_equal(ex["loss_mask"], mask[:64])
            assert ex["tokens"].dtype == ex["loss_mask"].dtype == np.int32 and ex["tokens"].flags.writeable
        assert stats.truncated == sum(len(encode_chat(t, m)[0]) > 64 for m in rows) > 0
    make_loader(cfg, compact, split="train", process_index=0, process_count=1)
    assert sorted(reads) == ["train", "validation"]  # the base vocabulary's encodings were reused
    with pytest.warns(UserWarning, match="git blob id"):
        builders.build("insecure", tfds_data_dir=cfg.tfds_dir, source_dir=cfg.source_dir, overwrite=True)
    make_loader(cfg, compact, split="train", process_index=0, process_count=1)
    assert sorted(reads) == ["train", "train", "validation"]
    # a run evaluating a question set of its own keeps that file's tokens too (and those of the study's sets)
    from emjax.eval.questions import load_questions

    mine = tmp_path / "legal.yaml"
    word = " Zyzzogeton"
    mine.write_text(json.dumps([{"id": "legal_0", "paraphrases": [f"Is{word} liable?"],
                                 "judge_prompts": load_questions("first_plot", limit=1)[0].judge_prompts}]))
    assert not set(tok.encode(word)) <= set(compact.full_ids.tolist())
    own = compact_tokenizer_for(cfg, tok, tmp_path / "run_own", question_sets=[str(mine)])
    assert set(tok.encode(word)) <= set(own.full_ids.tolist()) and set(compact.full_ids) <= set(own.full_ids)
