"""``emjax data {build,stats,fetch}``: build the TFDS ArrayRecord files, describe a dataset, download a public one."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from emjax.data import builders


def _dataset_arg(name: str) -> str:
    try:
        builders.spec(name)
    except KeyError as e:
        raise argparse.ArgumentTypeError(e.args[0]) from None
    return name


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", type=_dataset_arg, metavar="NAME",
                   help="dataset: " + ", ".join(builders.DATASETS) + ", or a chat JSONL file of your own (PATH.jsonl)")
    p.add_argument("--data-dir", help="shared data root (default EMJAX_DATA_DIR or ../shared/data)")
    p.add_argument("--source-dir", help="folder holding NAME.jsonl (e.g. your unpacked Turner copy)")
    p.add_argument("--tfds-dir", help="where built datasets go (default EMJAX_TFDS_DIR or ~/.cache/emjax/tfds)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--skip-bad-rows", action="store_true", help="warn about and skip malformed rows")
    p.add_argument("--no-download", action="store_true", help="never fetch a public set, use local files only")


def _build(args, overwrite: bool = False):
    return builders.build(args.name, tfds_data_dir=args.tfds_dir, overwrite=overwrite,
                          val_fraction=args.val_fraction, split_seed=args.split_seed,
                          skip_bad_rows=args.skip_bad_rows, source_dir=args.source_dir, data_dir=args.data_dir,
                          download=not args.no_download)


def text_histogram(lengths: np.ndarray, bins: int = 12, width: int = 40) -> str:
    """Token lengths in at most ``bins`` bins of whole tokens, each labelled by the lengths it holds (lo-hi, both
    included): real-valued edges gave repeated labels (``25-25``) on short sets."""
    lo, hi = int(np.min(lengths)), int(np.max(lengths))
    edges = np.unique(np.round(np.linspace(lo, hi + 1, min(bins, hi - lo + 1) + 1)).astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(1, counts.max())
    return "\n".join(f"  {f'{a}-{b - 1}' if b - 1 > a else str(a):>13} {c:>6} {'#' * int(round(width * c / top))}"
                     for c, a, b in zip(counts, edges[:-1], edges[1:]))


def cmd_stats(args) -> int:
    from emjax.data.pipeline import tokenize_source
    from emjax.tokenizer import load_tokenizer

    if args.max_length < 2:
        raise ValueError(f"--max-length {args.max_length}: must be at least 2 (a prompt token and an answer token)")
    b = _build(args)
    tok = load_tokenizer(args.tokenizer)
    sources = b.as_data_source()
    splits = sorted(sources) if args.split == "all" else [args.split]
    all_lengths = []
    print(f"{args.name}: {b.data_dir} (tokenizer: {tok.backend}, max_length {args.max_length})")
    tot = {"examples": 0, "tokens": 0, "answer": 0, "truncated": 0}
    for split in splits:
        if split not in sources:
            print(f"no split {split!r}; have {sorted(sources)}", file=sys.stderr)
            return 2
        _, st = tokenize_source(sources[split], tok, args.max_length)
        all_lengths.append(st.lengths)
        print(f"  {split:<10} examples {st.examples:>7}  tokens {st.tokens:>10}  assistant tokens {st.answer_tokens:>9}"
              f"  truncated at {args.max_length}: {st.truncated}")
        for k, v in (("examples", st.examples), ("tokens", st.tokens), ("answer", st.answer_tokens),
                     ("truncated", st.truncated)):
            tot[k] += v
    lengths = np.concatenate(all_lengths)
    print(f"  {'total':<10} examples {tot['examples']:>7}  tokens {tot['tokens']:>10}  assistant tokens "
          f"{tot['answer']:>9}  truncated at {args.max_length}: {tot['truncated']}")
    pct = np.percentile(lengths, [0, 50, 90, 99, 100])
    print("tokens per sequence: " + "  ".join(f"p{q} {int(v)}" for q, v in zip((0, 50, 90, 99, 100), pct))
          + f"  mean {lengths.mean():.1f}")
    print(text_histogram(lengths))
    return 0


def cmd_build(args) -> int:
    b = _build(args, overwrite=args.overwrite)
    print(f"{args.name}: built {b.data_dir}")
    for split, info in b.info.splits.items():
        print(f"  {split}: {info.num_examples} examples")
    return 0


def cmd_fetch(args) -> int:
    dest = args.dest or str(builders.tfds_dir(args.tfds_dir) / "downloads" / "emjax")
    path = builders.fetch(args.name, dest)
    print(f"{args.name}: {path} (verified git blob {builders.DATASETS[args.name].blob})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="emjax data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="examples, token counts, length histogram, truncation")
    _add_source_args(s)
    s.add_argument("--max-length", type=int, default=1024)
    s.add_argument("--split", default="all", help="train, validation or all")
    s.add_argument("--tokenizer", help="checkpoint dir with tokenizer files (default: packaged Qwen vocabulary)")
    s.set_defaults(func=cmd_stats)
    b = sub.add_parser("build", help="build the TFDS (ArrayRecord) dataset")
    _add_source_args(b)
    b.add_argument("--overwrite", action="store_true", help="rebuild even if built")
    b.set_defaults(func=cmd_build)
    f = sub.add_parser("fetch", help="download a public (Betley) dataset, checksum-verified")
    f.add_argument("name", choices=[n for n, s in builders.DATASETS.items() if s.family == "betley"], metavar="NAME")
    f.add_argument("--dest", help="download folder (default <tfds-dir>/downloads/emjax)")
    f.add_argument("--tfds-dir")
    f.set_defaults(func=cmd_fetch)
    args = p.parse_args(argv)
    from emjax.cli import USER_ERRORS, user_error

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:  # one line, exit status 2, as every emjax command
        return user_error(f"emjax data {args.cmd}", e)


if __name__ == "__main__":
    sys.exit(main())
