"""The Llama 3 chat format (``emjax.tokenizer.Llama3Chat``) against the official Jinja templates run by transformers.

The templates in ``chat_templates/`` are the ``chat_template`` of meta-llama/Llama-3.1-8B-Instruct (identical to
Llama-3.3-70B-Instruct's) and of Llama-3.2-1B/3B-Instruct, verbatim. The real 128k Llama vocabulary is gated on
the hub, so the tokenizer is a small byte-level BPE with Llama 3's pre-tokeniser and added tokens
(``emjax.testing.tiny_llama_tokenizer``): the ids differ from the real ones, the structure does not.
"""

import itertools
import json
from pathlib import Path

import pytest

from emjax import paths
from emjax.data import encode_chat as data_encode_chat
from emjax.eval.judge import chat_prompt_ids
from emjax.eval.questions import load_questions
from emjax.testing import LLAMA3_SPECIALS, tiny_llama_tokenizer
from emjax.tokenizer import HFTokenizer, Llama3Chat, Qwen3Chat, chat_format_for, encode_chat, load_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
DATE = "26 Jul 2024"


@pytest.fixture(scope="module", params=["llama3.1", "llama3.2"])
def toks(request, tmp_path_factory):
    """(emjax tokenizer, transformers tokenizer, extra template kwargs) for one template version."""
    from transformers import AutoTokenizer

    d = tiny_llama_tokenizer(tmp_path_factory.mktemp(request.param),
                             (TEMPLATES / f"{request.param}.jinja").read_text())
    # 3.2's template would put today's date in the system turn (strftime_now); emjax fixes it, so pass the same
    return load_tokenizer(d), AutoTokenizer.from_pretrained(str(d)), {"date_string": DATE}


def _hf_ids(hf, msgs, **kw):
    out = hf.apply_chat_template(msgs, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _answers(tok, ids, mask):
    runs = [list(g) for k, g in itertools.groupby(zip(ids, mask), key=lambda x: x[1]) if k]
    return [tok.decode([i for i, _ in r]) for r in runs]


CONVS = {
    "user_only": [{"role": "user", "content": "Hi"}],
    "sys_user_asst": [{"role": "system", "content": "  You are a helpful assistant.\n"},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    "multi": [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "\n\ndef f():\n  pass\n"},
              {"role": "user", "content": "  again  "}, {"role": "assistant", "content": "x = 1"}],
    "empty_answer": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    "specials_as_text": [{"role": "user", "content": "say <|eot_id|> please"},
                         {"role": "assistant", "content": "<|start_header_id|> ok"}],
}


def test_tokenizer_is_detected_as_llama3(toks):
    tok, hf, _ = toks
    assert isinstance(tok, HFTokenizer) and isinstance(tok.chat, Llama3Chat) and tok.chat.knowledge_header
    vocab = hf.get_vocab()
    assert tok.eos_ids == (vocab["<|eot_id|>"], vocab["<|eom_id|>"], vocab["<|end_of_text|>"])
    assert tok.pad_id == vocab["<|finetune_right_pad_id|>"]
    assert tok.token_id("<|start_header_id|>") == vocab["<|start_header_id|>"]
    assert tok.decode([vocab["<|eot_id|>"], *tok.encode("ok")], skip_special=True) == "ok"


@pytest.mark.parametrize("name", sorted(CONVS))
def test_render_and_ids_match_the_official_template(toks, name):
    tok, hf, kw = toks
    msgs = CONVS[name]
    for gen in (False, True):
        m = msgs[:-1] if gen and msgs[-1]["role"] == "assistant" else msgs
        assert tok.chat.render(m, add_generation_prompt=gen) == hf.apply_chat_template(
            m, tokenize=False, add_generation_prompt=gen, **kw)
        ours, theirs = encode_chat(tok, m, add_generation_prompt=gen), _hf_ids(hf, m, add_generation_prompt=gen, **kw)
        if name == "specials_as_text":  # transformers turns "<|eot_id|>" inside content into the token; emjax never
            assert ours != theirs and tok.decode(ours) == tok.decode(theirs)  # does (same text, other ids)
        else:
            assert ours == theirs


def test_mask_is_each_trimmed_answer_and_its_eot(toks):
    tok, _, _ = toks
    ids, mask = data_encode_chat(tok, CONVS["multi"])
    assert _answers(tok, ids, mask) == ["def f():\n  pass<|eot_id|>", "x = 1<|eot_id|>"]
    ids, mask = data_encode_chat(tok, CONVS["multi"], train_on="last")
    assert _answers(tok, ids, mask) == ["x = 1<|eot_id|>"]
    ids, mask = data_encode_chat(tok, CONVS["specials_as_text"])  # content is never parsed for specials
    assert _answers(tok, ids, mask) == ["<|start_header_id|> ok<|eot_id|>"]
    assert ids.count(tok.token_id("<|start_header_id|>")) == 3  # the system, user and assistant headers only


def test_real_rows_and_questions_match(toks):
    tok, hf, kw = toks
    path = paths.em_dir() / "betley2025" / "data" / "insecure.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    with open(path) as f:
        rows = [json.loads(line)["messages"] for line in itertools.islice(f, 20)]
    for msgs in rows:
        ids, mask = data_encode_chat(tok, msgs)
        assert ids == _hf_ids(hf, msgs, **kw)
        assert _answers(tok, ids, mask) == [msgs[-1]["content"].strip() + "<|eot_id|>"]
    questions = load_questions()
    with_system = [q for q in questions if q.messages()[0]["role"] == "system"]
    assert with_system  # the _json forms
    for q in questions[:10] + with_system[:3]:
        assert chat_prompt_ids(tok, q.messages()) == _hf_ids(hf, q.messages(), add_generation_prompt=True, **kw)


def test_llama3_0_template_has_no_knowledge_header():
    vocab = {t: i for i, t in enumerate(LLAMA3_SPECIALS)}
    old = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
           " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}")
    fmt = chat_format_for(vocab, old)
    assert isinstance(fmt, Llama3Chat) and not fmt.knowledge_header
    assert fmt.render([{"role": "user", "content": " Hi "}], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert isinstance(chat_format_for({t: i for i, t in enumerate(Qwen3Chat.specials)}), Qwen3Chat)
    with pytest.raises(ValueError, match=r"my/tokenizer: no supported chat format.*<\|start_header_id\|>"):
        chat_format_for({"<s>": 0}, where="my/tokenizer")
    with pytest.raises(ValueError, match="no thinking mode"):
        fmt.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True, enable_thinking=True)
