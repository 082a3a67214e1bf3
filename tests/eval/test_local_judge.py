"""LocalJudge on fake logits whose next-token distributions are set by hand, in both tokenisation modes."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from emjax.eval.judge import LocalJudge, chat_prompt_ids, render_chat, score_from_probs, verdict_from_probs

SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]


class CharTok:
    """Char-level tokenizer (digits split, like Qwen3); with ``numbers=True`` also one token per "0".."100"."""

    def __init__(self, numbers=False):
        self.vocab = SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"]
        if numbers:
            self.vocab += [str(k) for k in range(10, 101)]
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.size = len(self.vocab)

    def encode(self, text):
        out, i = [], 0
        multi = sorted((t for t in self.vocab if len(t) > 1), key=len, reverse=True)
        while i < len(text):
            m = next((t for t in multi if text.startswith(t, i)), text[i])
            out.append(self.ids[m])
            i += len(m)
        return out

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def table_logits(tok, rows_a, rows_b=None):
    """logits[b, t] = log p(next | tokens[b, t]) from a per-previous-token table; rows whose prompt contains "B"
    use ``rows_b``. Masked positions are NaN so reading one would poison the score."""
    def table(rows):
        m = np.full((tok.size, tok.size), -1e9, np.float32)
        for prev, dist in rows.items():
            for t, p in dist.items():
                m[tok.ids[prev], tok.ids[t]] = math.log(p)
        return jnp.asarray(m)

    ta, tb = table(rows_a), table(rows_b or rows_a)

    def logits_fn(tokens, mask):
        has_b = jnp.cumsum(tokens == tok.ids["B"], axis=1) > 0
        lg = jnp.where(has_b[..., None], tb[tokens], ta[tokens])
        return jnp.where(mask[..., None] > 0, lg, jnp.nan)

    return logits_fn


def test_single_token_numbers_and_top20():
    tok = CharTok(numbers=True)
    letters = {c: 0.69 / 25 for c in "abcdefghijklmnopqrstuvwxy"}
    judge = LocalJudge(table_logits(tok, {"\n": {"80": 0.2, "90": 0.1, "9": 0.01, **letters}},
                                     {"\n": {"87": 0.9, "CODE"[0]: 0.1}}), tok, batch_size=2)
    assert judge.single_token
    prompts = ["answer A", "answer B", "a much longer answer A " * 5]
    probs = judge.judge_probs(prompts, kind="aligned")
    # "9" (p=0.01) is outside the top 20 and dropped, as the API would: score (80·.2 + 90·.1)/.3
    assert "9" not in probs[0] and len(probs[0]) == 20
    assert score_from_probs(probs[0]) == pytest.approx((80 * 0.2 + 90 * 0.1) / 0.3, abs=1e-4)
    assert {k: v for k, v in probs[1].items() if v > 1e-7} == pytest.approx({"87": 0.9, "C": 0.1}, abs=1e-6)
    assert score_from_probs(probs[1]) == pytest.approx(87.0, abs=1e-5)
    assert probs[2] == pytest.approx(probs[0], abs=1e-6)


def test_digit_split_numbers():
    tok = CharTok()
    im_end = "<|im_end|>"
    rows_a = {"\n": {"8": 0.5, "1": 0.3, "C": 0.2},  # first token
              "8": {"7": 0.6, im_end: 0.4},  # "8" then "7" or stop
              "1": {"0": 0.5, im_end: 0.5},
              "0": {"0": 0.2, im_end: 0.8}}  # after "10": "100" or stop
    rows_b = {"\n": {"C": 0.9, "O": 0.1}, "C": {"O": 1.0}}
    judge = LocalJudge(table_logits(tok, rows_a, rows_b), tok, batch_size=3)
    assert not judge.single_token
    probs = judge.judge_probs(["x A", "x B", "long A " * 9, "y A"], kind="aligned")
    want = {"8": 0.5 * 0.4, "87": 0.5 * 0.6, "1": 0.3 * 0.5, "10": 0.3 * 0.5 * 0.8, "100": 0.3 * 0.5 * 0.2,
            "C": 0.2}
    got = {k: v for k, v in probs[0].items() if v > 1e-7}
    assert got == pytest.approx(want, abs=1e-6)
    expected = (8 * .2 + 87 * .3 + 1 * .15 + 10 * .12 + 100 * .03) / 0.8
    for i in (0, 2, 3):
        assert score_from_probs(probs[i]) == pytest.approx(expected, abs=1e-4)
    assert score_from_probs(probs[1]) is None
    assert verdict_from_probs({"CODE" if k == "C" else k: v for k, v in probs[1].items()}) == "CODE"


def test_params_and_gathered_paths_agree():
    tok = CharTok()
    rows = {"\n": {"4": 0.7, "9": 0.3}, "4": {"2": 1.0}, "9": {im: 1.0 for im in ["<|im_end|>"]}}
    plain = LocalJudge(table_logits(tok, rows), tok, batch_size=2)
    base = table_logits(tok, rows)

    def gathered(p, tokens, mask, pos):
        lg = base(tokens, mask) * p
        return jnp.take_along_axis(lg, pos[:, :, None], axis=1)

    other = LocalJudge(gathered, tok, batch_size=2, params=jnp.float32(1.0), gathered=True)
    a, b = plain.judge_probs(["q"], kind="c"), other.judge_probs(["q"], kind="c")
    assert a == b
    assert score_from_probs(a[0]) == pytest.approx(42 * 0.7 + 9 * 0.3, abs=1e-4)


def test_prompt_rendering_matches_hf_template_and_qwen_digits():
    from transformers import AutoTokenizer

    from emjax.paths import qwen3_tokenizer_dir
    from emjax.tokenizer import load_tokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    msgs = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Hi <b>87</b>?"}]
    ref = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert render_chat(msgs) == ref
    ours = load_tokenizer()
    assert chat_prompt_ids(ours, msgs) == hf(ref, add_special_tokens=False)["input_ids"]
    # Qwen3 splits numbers into digits: LocalJudge must take the multi-token path
    judge = LocalJudge(lambda t, m: None, ours)
    assert not judge.single_token and judge.digit_ids.tolist() == list(range(15, 25))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tiny_emjax_model_gathered_matches_full_logits(tmp_path, moe):
    """The CLI's judge wiring (weights as jit arguments, LM head only where read) on a tiny random checkpoint, dense
    or Qwen3-MoE (a 30B-A3B judge), on one device and on a mesh."""
    from flax import nnx

    from emjax.eval.cli import model_judge_fn
    from emjax.models import from_pretrained
    from emjax.testing import tiny_hf_checkpoint

    tok = CharTok()
    model = from_pretrained(tiny_hf_checkpoint(tmp_path / "ckpt", vocab_size=128, moe=moe), dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    fn, params = model_judge_fn(model)
    full = LocalJudge(lambda t, m: nnx.merge(graphdef, state)(t, attention_mask=m), tok, batch_size=2)
    fast = LocalJudge(fn, tok, batch_size=2, params=params, gathered=True)
    prompts = ["short", "a longer prompt here"]
    a, b = full.judge_probs(prompts, kind="c"), fast.judge_probs(prompts, kind="c")
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-5 for k in x)
        assert 0 < sum(x.values()) <= 1 + 1e-5

    # the same judge on the 2×2×2 mesh (a judge too large for one device): each device scores its own rows (the
    # digit pass's 20 rows split over data × fsdp), with the same probabilities
    from emjax.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    fn, params = model_judge_fn(from_pretrained(tmp_path / "ckpt", dtype=jnp.float32, mesh=mesh))
    on_mesh = LocalJudge(fn, tok, batch_size=2, params=params, gathered=True)
    specs, real = [], on_mesh._digits
    on_mesh._digits = lambda p, *rows: specs.extend(r.sharding.spec for r in rows) or real(p, *rows)
    for x, y in zip(a, on_mesh.judge_probs(prompts, kind="c")):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-5 for k in x)
    assert specs and all(spec[0] == ("data", "fsdp") for spec in specs), specs
