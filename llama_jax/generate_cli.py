"""`llama-jax generate`: continue text prompts with a checkpoint and its tokenizer."""

from __future__ import annotations

import argparse
import sys
import time

HELP = "continue text prompts with a checkpoint (greedy or temperature / top-k / top-p sampling)"
EXAMPLE = ("llama-jax generate /models/llama2-7b --tokenizer /models/llama2-7b/tokenizer.model "
           "--prompt 'The capital of France is' --max-new-tokens 32\n"
           "  llama-jax generate quickstart/run --prompt 'import os'  # a training run finds its own tokenizer\n"
           "  llama-jax generate ckpt/ --tokenizer tokenizer.model --prompt 'Once upon a time' --prompt 'def fib(n):' "
           "--temperature 0.8 --top-p 0.95 --seed 1 --dtype bfloat16\n"
           "  llama-jax generate Meta-Llama-3-8B-Instruct/ --tokenizer Meta-Llama-3-8B-Instruct/tokenizer.model --chat "
           "--system 'Answer briefly.' --prompt 'Name three primes.'")

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model weights in any format `llama_jax.convert.load` reads "
                                           "(orbax, Meta consolidated.*.pth, Hugging Face safetensors), or a "
                                           "LoRA training run (its base with the run's adapters)")
    parser.add_argument("--tokenizer", metavar="TOKENIZER_FILE",
                        help="tokenizer.model (SentencePiece for LLaMA 1/2, tiktoken format for Llama 3); default: "
                             "tokenizer.model beside the checkpoint, or for a training run the tokenizer its data "
                             "manifest records")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="a prompt (repeat for a batch; each is encoded with BOS)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to add per prompt "
                                                                                   "(default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; 0 (the default) is greedy decoding")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample only among the K most likely "
                                                                            "tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample only from the smallest set of most likely tokens with probability ≥ P")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="PRNG seed for sampling (default 0)")
    parser.add_argument("--chat", action="store_true",
                        help="each prompt is a user message: format it with the model's chat template "
                             "(Llama 2-Chat [INST], Llama 3 headers) and stop at the end of the assistant's turn")
    parser.add_argument("--system", metavar="TEXT", help="with --chat: a system message before each prompt")
    parser.add_argument("--template", choices=("llama2", "llama3", "llama4"), default=None,
                        help="with --chat: the chat template (default: from the tokenizer)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, metavar="D",
                        help=f"compute dtype, one of {', '.join(_DTYPES)} (default: the checkpoint's)")


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, OSError) as e:  # ConfigError, ConvertError, bad arguments, unreadable files
        print(f"llama-jax generate: {e}", file=sys.stderr)
        return 2


def _lora_run(ckpt):
    """A LoRA training run (or one of its checkpoints) as (config, base with the adapters attached); None for
    any other weights. Its checkpoints hold the adapters only; the base comes from the run's train.init_from."""
    try:
        from llama_jax_train.adapters import adapted_model, lora_run_dir
    except ImportError:  # the library without the trainer: no training runs to read
        return None
    return adapted_model(ckpt) if lora_run_dir(ckpt) is not None else None


def _run(args: argparse.Namespace) -> int:
    import contextlib

    with contextlib.ExitStack() as stack:
        return _generate(args, stack)


def _generate(args: argparse.Namespace, stack) -> int:
    """gs:// weights that are not orbax, and a gs:// tokenizer, are read from temporary local copies (`stack`
    removes them); orbax checkpoints are read in place."""
    from llama_jax import storage
    from llama_jax.convert import staged

    for given in (args.checkpoint, args.tokenizer):
        if given is not None:
            storage.check_bucket(given, write=False)
    ckpt = storage.path(args.checkpoint)
    if not ckpt.exists():
        raise ValueError(f"checkpoint {ckpt} does not exist.")
    if args.tokenizer is not None and not storage.path(args.tokenizer).exists():
        raise ValueError(f"tokenizer file {args.tokenizer} does not exist.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    ckpt = storage.path(stack.enter_context(staged(ckpt)))

    from llama_jax.convert import find_tokenizer

    tok_path = storage.path(args.tokenizer) if args.tokenizer is not None else find_tokenizer(ckpt)
    if tok_path is None:
        raise ValueError(f"no tokenizer found for {ckpt} (no tokenizer.model beside it, and it is not inside a "
                         f"training run whose data manifest names one); pass --tokenizer FILE.")
    if storage.is_remote(tok_path):
        tok_path = stack.enter_context(storage.local_copy(tok_path))

    import jax

    from llama_jax.convert import load
    from llama_jax.generate import generate
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    cfg, params = _lora_run(ckpt) or load(str(ckpt))
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model in {ckpt} has a "
                         f"vocabulary of {cfg.vocab_size}; they do not belong together.")
    if args.tokenizer is None:
        print(f"tokenizer: {tok_path}", file=sys.stderr)
    # Run in whichever layer layout the weights are stored in (stacked `layers` or `layers_0`, ...).
    cfg = cfg.replace(scan_layers="layers" in params, remat="none", **({"dtype": args.dtype} if args.dtype else {}))

    stop_ids = tok.stop_ids
    if args.chat:
        from llama_jax.chat import default_template, encode_dialog, end_of_turn_ids

        template = args.template or default_template(tok)
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [encode_dialog(tok, system + [{"role": "user", "content": text}], template,
                                 add_generation_prompt=True)[0] for text in args.prompt]
        stop_ids = end_of_turn_ids(tok, template)
    elif args.system or args.template:
        raise ValueError("--system and --template go with --chat.")
    else:
        prompts = [tok.encode(text, bos=tok.bos_id >= 0, eos=False) for text in args.prompt]
    start = time.perf_counter()
    outs = generate(cfg, params, prompts, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop_ids=tuple(sorted(stop_ids)), vocab_limit=tok.vocab_size)
    seconds = time.perf_counter() - start
    for i, (text, ids, new) in enumerate(zip(args.prompt, prompts, outs)):
        if args.chat:  # the assistant's answer alone, without its end-of-turn token
            if i:
                print("\n" + "-" * 40)
            print(tok.decode([t for t in new if t not in stop_ids]), flush=True)
            continue
        # Decode prompt + continuation together and cut the prompt's text off, so a continuation that
        # starts a new word keeps its leading space (SentencePiece drops it when decoding a piece alone).
        prompt_text = tok.decode(ids)
        full = tok.decode(ids + new)
        cont = full[len(prompt_text):] if full.startswith(prompt_text) else tok.decode(new)
        if i:
            print("\n" + "-" * 40)
        print(text + cont, flush=True)
    n = sum(len(o) for o in outs)
    print(f"[{n} new tokens for {len(outs)} prompt(s) in {seconds:.2f}s, compilation included]", file=sys.stderr)
    return 0
