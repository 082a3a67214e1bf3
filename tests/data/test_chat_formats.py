"""The Llama 3 and Gemma 3 chat formats (``emjax.tokenizer.Llama3Chat``, ``Gemma3Chat``) against the official Jinja
templates run by transformers.

``chat_templates/`` holds the ``chat_template`` of meta-llama/Llama-3.1-8B-Instruct (identical to
Llama-3.3-70B-Instruct's), of Llama-3.2-1B/3B-Instruct and of google/gemma-3-4b-it (the same for 1b/12b/27b-it),
verbatim. The real vocabularies (128k, 262k) are gated on the hub, so the tokenizers are small BPEs with each
family's pre-tokenisation and added tokens (``emjax.testing.tiny_llama_tokenizer``, ``tiny_gemma_tokenizer``): the
ids differ from the real ones, the structure does not.
"""

import itertools
import json
from pathlib import Path

import pytest

from emjax import paths
from emjax.data import encode_chat as data_encode_chat
from emjax.eval.judge import chat_prompt_ids
from emjax.eval.questions import load_questions
from emjax.testing import LLAMA3_SPECIALS, tiny_gemma_tokenizer, tiny_llama_tokenizer
from emjax.tokenizer import (Gemma3Chat, HFTokenizer, Llama3Chat, Qwen3Chat, chat_format_for, encode_chat,
                             load_tokenizer)

TEMPLATES = Path(__file__).parent / "chat_templates"
# 3.2's template would put today's date in the system turn (strftime_now); emjax fixes it, so pass the same
KWARGS = {"llama3.1": {"date_string": "26 Jul 2024"}, "llama3.2": {"date_string": "26 Jul 2024"}, "gemma3": {}}
END = {"llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>", "gemma3": "<end_of_turn>"}


@pytest.fixture(scope="module", params=sorted(KWARGS))
def toks(request, tmp_path_factory):
    """(template name, emjax tokenizer, transformers tokenizer) for one template."""
    from transformers import AutoTokenizer

    make = tiny_gemma_tokenizer if request.param == "gemma3" else tiny_llama_tokenizer
    d = make(tmp_path_factory.mktemp(request.param), (TEMPLATES / f"{request.param}.jinja").read_text())
    return request.param, load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))


def _hf_ids(hf, msgs, name, **kw):
    out = hf.apply_chat_template(msgs, tokenize=True, **KWARGS[name], **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _answers(tok, ids, mask):
    runs = [list(g) for k, g in itertools.groupby(zip(ids, mask), key=lambda x: x[1]) if k]
    return [tok.decode([i for i, _ in r]) for r in runs]


CONVS = {
    "user_only": [{"role": "user", "content": "Hi"}],
    "sys_user_asst": [{"role": "system", "content": "  You are a helpful assistant.\n"},
                      {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    "multi": [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "\n\ndef f():\n  pass\n"},
              {"role": "user", "content": "  again  "}, {"role": "assistant", "content": "x = 1"}],
    "empty_answer": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    "specials_as_text": [{"role": "user", "content": "say <|eot_id|> <end_of_turn> please"},
                         {"role": "assistant", "content": "<|start_header_id|> <start_of_turn> ok"}],
}


def test_tokenizer_detects_the_family_and_its_ids(toks):
    name, tok, hf = toks
    vocab = hf.get_vocab()
    assert isinstance(tok, HFTokenizer)
    if name == "gemma3":
        assert isinstance(tok.chat, Gemma3Chat)
        assert tok.eos_ids == (vocab["<end_of_turn>"], vocab["<eos>"]) and tok.pad_id == vocab["<pad>"] == 0
    else:
        assert isinstance(tok.chat, Llama3Chat) and tok.chat.knowledge_header
        assert tok.eos_ids == (vocab["<|eot_id|>"], vocab["<|eom_id|>"], vocab["<|end_of_text|>"])
        assert tok.pad_id == vocab["<|finetune_right_pad_id|>"]
    assert tok.token_id(END[name]) == vocab[END[name]]
    assert tok.decode([vocab[END[name]], *tok.encode("ok now")], skip_special=True) == "ok now"


@pytest.mark.parametrize("conv", sorted(CONVS))
def test_render_and_ids_match_the_official_template(toks, conv):
    name, tok, hf = toks
    msgs = CONVS[conv]
    for gen in (False, True):
        m = msgs[:-1] if gen and msgs[-1]["role"] == "assistant" else msgs
        assert tok.chat.render(m, add_generation_prompt=gen) == hf.apply_chat_template(
            m, tokenize=False, add_generation_prompt=gen, **KWARGS[name])
        ours, theirs = encode_chat(tok, m, add_generation_prompt=gen), _hf_ids(hf, m, name, add_generation_prompt=gen)
        if conv == "specials_as_text" and ours != theirs:  # transformers turns a special's text inside content into
            assert tok.decode(ours) == tok.decode(theirs)  # the token; emjax never does (same text, other ids)
        else:
            assert ours == theirs


def test_mask_is_each_trimmed_answer_and_its_end_of_turn(toks):
    name, tok, _ = toks
    end = END[name]
    ids, mask = data_encode_chat(tok, CONVS["multi"])
    assert _answers(tok, ids, mask) == [f"def f():\n  pass{end}", f"x = 1{end}"]
    ids, mask = data_encode_chat(tok, CONVS["multi"], train_on="last")
    assert _answers(tok, ids, mask) == [f"x = 1{end}"]
    ids, mask = data_encode_chat(tok, CONVS["specials_as_text"])  # content is never parsed for specials
    assert _answers(tok, ids, mask) == [f"<|start_header_id|> <start_of_turn> ok{end}"]
    assert ids.count(tok.token_id(end)) == (2 if name == "gemma3" else 3)  # + Llama's system turn; none from text


def test_real_rows_and_questions_match(toks):
    name, tok, hf = toks
    path = paths.em_dir() / "betley2025" / "data" / "insecure.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    with open(path) as f:
        rows = [json.loads(line)["messages"] for line in itertools.islice(f, 20)]
    for msgs in rows:
        ids, mask = data_encode_chat(tok, msgs)
        assert ids == _hf_ids(hf, msgs, name)
        assert _answers(tok, ids, mask) == [msgs[-1]["content"].strip() + END[name]]
    questions = load_questions()
    with_system = [q for q in questions if q.messages()[0]["role"] == "system"]
    assert with_system  # the _json forms
    for q in questions[:10] + with_system[:3]:
        assert chat_prompt_ids(tok, q.messages()) == _hf_ids(hf, q.messages(), name, add_generation_prompt=True)


def test_detection_llama3_0_gemma_roles_and_errors():
    vocab = {t: i for i, t in enumerate(LLAMA3_SPECIALS)}
    old = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
           " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}")
    fmt = chat_format_for(vocab, old)  # Llama 3.0: no knowledge-date system turn
    assert isinstance(fmt, Llama3Chat) and not fmt.knowledge_header
    assert fmt.render([{"role": "user", "content": " Hi "}], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert isinstance(chat_format_for({t: i for i, t in enumerate(Qwen3Chat.specials)}), Qwen3Chat)
    with pytest.raises(ValueError, match=r"my/tokenizer: no supported chat format.*<\|start_header_id\|>"):
        chat_format_for({"<s>": 0}, where="my/tokenizer")
    for f in (fmt, Gemma3Chat()):
        with pytest.raises(ValueError, match="no thinking mode"):
            f.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True, enable_thinking=True)
    with pytest.raises(ValueError, match="roles must alternate.*turn 1 is 'user'"):
        Gemma3Chat().render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
