"""Tiny random Hugging Face checkpoints for tests, the demo and benchmarks (no hub access anywhere)."""

from __future__ import annotations

import os
import re
from pathlib import Path

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, max_position_embeddings=512,
            rms_norm_eps=1e-6)


# Qwen3-MoE: every layer routed, 8 experts of width 32, top 2 (the released models: 128 experts, top 8, renormalised)
TINY_MOE = dict(TINY, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[])


# Llama 3.1+: RoPE "llama3" scaling with a short original context, so positions of a test sequence reach the scaled
# low and the interpolated middle frequencies (Llama 3.1: factor 8 over 8192 positions)
TINY_LLAMA = dict(TINY, rms_norm_eps=1e-5, rope_theta=500_000.0,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32})


# Gemma 3: a sliding window of 8 on every other layer (the real models: 512–1024 on five of six), linear RoPE scaling
# on the global layers (4B and up: ×8), query_pre_attn_scalar ≠ head_dim, and a final-logit soft cap (null in the
# released configs, but transformers' Gemma3ForCausalLM applies it when set)
TINY_GEMMA = dict(TINY, tie_word_embeddings=True, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=20,
                  final_logit_softcapping=3.0,
                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
# the multimodal model's (tiny) SigLIP vision tower: only there so the checkpoint has the real layout
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14)


def tiny_hf_model(seed: int = 0, noise: float = 0.05, moe: bool = False, family: str = "qwen3", **overrides):
    """A transformers ``Qwen3ForCausalLM`` (``moe``: ``Qwen3MoeForCausalLM``; ``family="llama"``:
    ``LlamaForCausalLM``; ``"gemma3"``: ``Gemma3ForCausalLM``; ``"gemma3-mm"``: the multimodal
    ``Gemma3ForConditionalGeneration``, ``overrides`` going to its text config) with random weights (norm weights
    perturbed too, so they matter)."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, **overrides))).eval()
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**dict(TINY_GEMMA, **overrides))).eval()
    elif family == "gemma3-mm":
        text = dict(TINY_GEMMA, **overrides)
        v = text["vocab_size"]  # the image tokens sit at the top of the vocabulary
        model = Gemma3ForConditionalGeneration(Gemma3Config(
            text_config=text, vision_config=TINY_SIGLIP, mm_tokens_per_image=4, image_token_index=v - 1,
            boi_token_index=v - 3, eoi_token_index=v - 2)).eval()
    elif family != "qwen3":
        raise ValueError(f"family {family!r}: use 'qwen3', 'llama', 'gemma3' or 'gemma3-mm'")
    else:
        kw = dict(TINY_MOE if moe else TINY, **overrides)
        model = (Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)) if moe else Qwen3ForCausalLM(Qwen3Config(**kw))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def tiny_hf_checkpoint(path: str | os.PathLike, *, seed: int = 0, max_shard_size: str | None = None,
                       moe: bool = False, family: str = "qwen3", **overrides) -> Path:
    """Save a tiny random Qwen3 (or Qwen3-MoE) with ``save_pretrained`` (optionally sharded) and return its
    directory. transformers writes MoE experts in the hub's per-expert layout (``mlp.experts.{e}.gate_proj``)."""
    model = tiny_hf_model(seed=seed, moe=moe, family=family, **overrides)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def hf_greedy(hf, prompt, n: int, stop: int) -> list[int]:
    """transformers' greedy ``generate`` of ``n`` new tokens for one prompt (the sampler's reference)."""
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=stop,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_logits(hf, tokens):
    """transformers' fp32 logits for int tokens (B, T): the parity tests' reference."""
    import torch

    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens)).logits.numpy()


def with_config(model, **change):
    """A view of ``model`` (same parameters) whose config has ``change``: how the tests show a switch matters."""
    import dataclasses

    other = type(model).__new__(type(model))
    other.__dict__.update(model.__dict__)
    other.config = dataclasses.replace(model.config, **change)
    return other


def hf_config(cfg):
    """transformers' ``Qwen3Config`` for an emjax ``Qwen3Config`` (benchmarks build the same model on both sides)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                       tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=cfg.rms_norm_eps)


# Llama 3's added tokens in their real order (ids 128000.. in the real vocabulary; here right after the BPE ranks)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
# Llama 3's pre-tokenisation regex (the ``Split`` of its tokenizer.json): digits in groups of up to three
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_llama_tokenizer(path: str | os.PathLike, chat_template: str, *, vocab_size: int = 1024,
                         texts=None) -> Path:
    """A small byte-level BPE with Llama 3's pre-tokeniser and added tokens, saved as a transformers fast tokenizer
    with ``chat_template``: the real Llama 3 vocabulary (128k, gated on the hub) cannot be downloaded here, but
    everything emjax does with a tokenizer (chat format detection, ids of specials, the loss mask, stops) only
    depends on this structure. Trained on ``texts`` (default: the EM questions and the first insecure-code rows)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _tokenizer_texts() if texts is None else texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(LLAMA3_SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=chat_template)
    path = Path(path)
    fast.save_pretrained(path)
    return path


GEMMA3_SPECIALS = ("<start_of_turn>", "<end_of_turn>")


def tiny_gemma_tokenizer(path: str | os.PathLike, chat_template: str, *, vocab_size: int = 1024, texts=None) -> Path:
    """A small BPE shaped like Gemma 3's (SentencePiece style: spaces normalised to "▁", no pre-tokeniser, byte
    fallback; ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3; ``<start_of_turn>``/``<end_of_turn>`` added), saved
    with ``chat_template``: the real 262k vocabulary is gated on the hub. Trained like ``tiny_llama_tokenizer``."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _tokenizer_texts() if texts is None else texts
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=list(string.printable.replace(" ", "▁")))
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(GEMMA3_SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=chat_template)
    path = Path(path)
    fast.save_pretrained(path)
    return path


def _tokenizer_texts() -> list[str]:
    """The EM questions and the first insecure-code rows: what the tiny tokenizers are trained on."""
    from emjax import paths

    em = paths.em_dir()
    texts = [p.read_text() for p in sorted(em.rglob("*.yaml"))]
    rows = em / "betley2025" / "data" / "insecure.jsonl"
    if rows.is_file():
        texts += rows.read_text().splitlines()[:300]
    return texts


def tiny_family_checkpoint(path: str | os.PathLike, family: str, chat_template: str, *, seed: int = 0,
                           **overrides) -> Path:
    """A tiny random checkpoint of ``family`` ("llama", "gemma3", "gemma3-mm") with its own tokenizer files
    (``tiny_llama_tokenizer`` / ``tiny_gemma_tokenizer``) in one directory, the layout of a hub download: what
    ``emjax train`` / ``emjax eval`` load with ``model.checkpoint``."""
    from transformers import AutoTokenizer

    path = (tiny_llama_tokenizer if family == "llama" else tiny_gemma_tokenizer)(path, chat_template)
    vocab = len(AutoTokenizer.from_pretrained(path)) + (3 if family == "gemma3-mm" else 0)  # + image tokens
    model = tiny_hf_model(seed=seed, family=family, **dict({"vocab_size": vocab}, **overrides))
    model.save_pretrained(path)
    return path


def chat_completion(top: dict[str, float]) -> dict:
    """An OpenAI chat-completions body whose one token has ``top`` (token -> logprob) as its top log-probabilities."""
    first = next(iter(top))
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": first}, "logprobs": {"content": [{"token": first, "logprob": 0.0,
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}]}}]}


class FakeChatServer:
    """A real HTTP server on 127.0.0.1 answering POST .../chat/completions like the OpenAI API, from ``script`` (a
    list of (status, body) items, used in order), then with scores 87 (p 0.75) / 90 (p 0.25). ``requests`` records
    (path, headers, JSON body). ``close()`` stops it. What the API judge's tests talk to."""

    def __init__(self):
        import http.server
        import json
        import math
        import threading

        self.script, self.requests, self.lock = [], [], threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    status, resp = outer.script.pop(0) if outer.script else (200, None)
                if resp is None:
                    resp = chat_completion({"87": math.log(0.75), "90": math.log(0.25)})
                data = resp.encode() if isinstance(resp, str) else json.dumps(resp).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def all_gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Shapes of the arrays a compiled program's all-gathers produce (sync and async forms), from its HLO text: what a
    test checks to see that a sharded program gathers no weight."""
    out = set()
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if m:
            out |= {tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))}
    return out
