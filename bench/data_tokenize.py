"""Tokenising EM chats: emjax (tiktoken backend + Python template) vs transformers' apply_chat_template; then a
whole training split as the trainer tokenises it (``emjax.data.pipeline.tokenize_source``), its records read
directly (``emjax.data.builders.records``) vs through ``grain.MapDataset``'s iterator, alternately, twice each.

Default: the first 500 rows of insecure.jsonl (a few seconds on 2 CPU cores); --rows 0 for the whole file.
    .venv/bin/python bench/data_tokenize.py [--rows N] [--dataset insecure|jailbroken]
"""

import argparse
import itertools
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--dataset", default="insecure")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from emjax import paths
    from emjax.data import encode_chat
    from emjax.tokenizer import load_tokenizer

    path = paths.em_dir() / "betley2025" / "data" / f"{args.dataset}.jsonl"
    with open(path) as f:
        rows = [json.loads(line)["messages"] for line in itertools.islice(f, args.rows or None)]
    t = time.perf_counter()
    hf = AutoTokenizer.from_pretrained(str(paths.qwen3_tokenizer_dir()))
    t_hf_load = time.perf_counter() - t
    t = time.perf_counter()
    tik = load_tokenizer()
    t_tik_load = time.perf_counter() - t
    hft = load_tokenizer(paths.qwen3_tokenizer_dir())

    def run(fn):
        t = time.perf_counter()
        out = [fn(m) for m in rows]
        return time.perf_counter() - t, out

    def hf_ids(m):
        r = hf.apply_chat_template(m, tokenize=True)
        return list(r["input_ids"] if hasattr(r, "keys") else r)

    t_hf, ref = run(hf_ids)
    t_tik, ours = run(lambda m: encode_chat(tik, m)[0])
    t_hft, ours_hf = run(lambda m: encode_chat(hft, m)[0])
    ntok = sum(map(len, ref))
    assert ours == ref and ours_hf == ref, "ids differ from apply_chat_template"
    print(f"{len(rows)} rows of {args.dataset}, {ntok} tokens (ids identical to apply_chat_template)")
    print(f"{'method':<48}{'seconds':>9}{'k tok/s':>10}{'ratio':>8}")
    for name, s in [("transformers apply_chat_template (ids only)", t_hf),
                    ("emjax encode_chat, tiktoken backend (+mask)", t_tik),
                    ("emjax encode_chat, transformers backend (+mask)", t_hft)]:
        print(f"{name:<48}{s:>9.3f}{ntok / s / 1e3:>10.1f}{t_hf / s:>7.2f}x")
    print(f"load: transformers {t_hf_load:.2f}s, tiktoken {t_tik_load:.2f}s ({t_hf_load / t_tik_load:.1f}x)")
    split_read(args.dataset, tik)


def split_read(dataset: str, tok) -> None:
    import grain

    from emjax.data import builders, pipeline

    src = builders.data_source(dataset, "train")
    direct = builders.records

    def through_grain(source, chunk=0):
        return iter(grain.MapDataset.source(source))

    times = {"direct": [], "grain": []}
    for _ in range(2):
        for name, reader in (("direct", direct), ("grain", through_grain)):
            builders.records = reader  # tokenize_source reads through this name
            pipeline.forget_encodings()  # each try tokenises afresh
            t = time.perf_counter()
            examples, _ = pipeline.tokenize_source(src, tok, 256)
            times[name].append(time.perf_counter() - t)
            builders.records = direct
            if name == "direct":
                ref = examples
            else:
                assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(ref, examples)), "tokens differ"
    d, g = min(times["direct"]), min(times["grain"])
    print(f"tokenising the {len(src)}-row {dataset} training split (same tokens): records read directly "
          f"{d:.2f} s, through grain.MapDataset's iterator {g:.2f} s ({g / d:.2f}x, fastest of two each)")


if __name__ == "__main__":
    main()
