"""`llama-jax prepare`: tokenize text, JSONL or Parquet into ArrayRecord shards plus a manifest."""

from __future__ import annotations

import argparse
import sys

HELP = "tokenize text/JSONL/Parquet inputs into ArrayRecord shards + manifest.json for training"
EXAMPLE = (
    "llama-jax prepare data/*.jsonl.zst --text-field text --tokenizer llama2/tokenizer.model --output data/prepared\n"
    "  llama-jax prepare seed_tasks.jsonl --format alpaca --tokenizer llama3/tokenizer.model --output data/sft"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, directories or globs; the format comes from the extension (.txt and other text, "
        ".jsonl/.ndjson/.json with optional .gz/.zst, .parquet), or hf:NAME[:CONFIG[:SPLIT]] for a "
        "Hugging Face dataset (needs `datasets` and network access); files, directories and globs may be "
        "gs://BUCKET/PATH",
    )
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="output directory: local or gs://BUCKET/PATH (each shard uploaded as it finishes, "
                        "manifest.json last)")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="tokenizer.model (SentencePiece or Llama 3 tiktoken); local or gs://")
    parser.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="train a SentencePiece BPE tokenizer on the inputs, write it to DIR/tokenizer.model and use it",
    )
    parser.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size for --train-tokenizer")
    parser.add_argument(
        "--tokenizer-sample-mb", type=float, default=256, metavar="MB", help="input text used to train the tokenizer (default 256)"
    )
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text; a.b for nested (default text)")
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=("text", "jsonl", "parquet", "alpaca", "messages"),
        help="override the format for every input; alpaca (instruction/input/output, or Self-Instruct's "
        "instruction/instances) and messages (chat: [{role, content}]) read JSONL records into fine-tuning "
        "examples with a loss mask on the responses",
    )
    parser.add_argument(
        "--template",
        choices=("llama2", "llama3", "llama4"),
        help="chat template for --format messages (default: from the tokenizer: Llama 3 ids -> llama3, else "
        "llama2); with --format alpaca, render each example as a user turn and the answer in this template "
        "instead of Alpaca's prompt",
    )
    parser.add_argument(
        "--split-blank-lines",
        action="store_true",
        help="plain text: one document per blank-line-separated paragraph (default: one per file)",
    )
    parser.add_argument(
        "--python-stdlib",
        action="store_true",
        help="add the Python standard library's .py files (the offline quickstart corpus) to the inputs",
    )
    parser.add_argument("--workers", type=int, metavar="N", help="tokenizer processes (default: one per core)")
    parser.add_argument("--unit-mb", type=float, metavar="MB", help="input per shard (default: inputs/64, 1-256 MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace data prepared from other inputs in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from llama_jax_data.prepare import prepare
    from llama_jax_data.sources import default_corpus

    inputs = list(args.inputs)
    if args.python_stdlib:
        inputs += [str(p) for p in default_corpus()]
    if not inputs:
        print("llama-jax prepare: error: no INPUT given (or pass --python-stdlib)", file=sys.stderr)
        return 2
    if args.train_tokenizer and args.tokenizer:
        print("llama-jax prepare: error: pass --tokenizer FILE or --train-tokenizer, not both", file=sys.stderr)
        return 2
    if not args.train_tokenizer and not args.tokenizer:
        print("llama-jax prepare: error: pass --tokenizer FILE, or --train-tokenizer --vocab-size N", file=sys.stderr)
        return 2
    if args.train_tokenizer and not args.vocab_size:
        print("llama-jax prepare: error: --train-tokenizer needs --vocab-size N", file=sys.stderr)
        return 2
    try:
        manifest = prepare(
            inputs,
            args.output,
            args.tokenizer,
            text_field=args.text_field,
            split_blank_lines=args.split_blank_lines,
            fmt=None if args.fmt in ("alpaca", "messages") else args.fmt,
            record_format=args.fmt if args.fmt in ("alpaca", "messages") else "text",
            template=args.template,
            train_tokenizer=args.train_tokenizer,
            vocab_size=args.vocab_size,
            tokenizer_sample_bytes=int(args.tokenizer_sample_mb * 1e6),
            workers=args.workers,
            unit_bytes=int(args.unit_mb * (1 << 20)) if args.unit_mb else None,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, OSError, RuntimeError) as e:
        print(f"llama-jax prepare: error: {e}", file=sys.stderr)
        return 1
    if not manifest.get("fingerprint"):
        return 1
    print(f"{args.output}/manifest.json: {manifest['documents']} documents, {manifest['tokens']} tokens")
    return 0
