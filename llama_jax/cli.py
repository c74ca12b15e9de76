"""The `llama-jax` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module, imported only when it runs (so `llama-jax --help` is instant
and the model library never imports the trainer). A subcommand module defines:

    HELP: str                                   one line for `llama-jax --help`
    EXAMPLE: str                                shown at the end of `llama-jax CMD --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> int       the exit status
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module implementing it. Order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "quickstart": "llama_jax_train.quickstart",
    "prepare": "llama_jax_data.cli",
    "train": "llama_jax_train.cli",
    "eval": "llama_jax_train.eval_cli",
    "convert": "llama_jax.convert.cli",
    "generate": "llama_jax.generate_cli",
    "scaling": "llama_jax_train.scaling.cli",
    "bench": "llama_jax_bench.cli",
    "preflight": "llama_jax_launch.preflight",
    "launch": "llama_jax_launch.cli",
}


def _load(name: str):
    try:
        return importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as e:
        if e.name and COMMANDS[name].startswith(e.name):
            return None  # not part of this build
        raise


def _top_level_help() -> str:
    lines = ["usage: llama-jax COMMAND [options]   (llama-jax COMMAND --help for each)", "", "commands:"]
    for name in COMMANDS:
        mod = _load(name)
        if mod is not None:
            lines.append(f"  {name:<12}{mod.HELP}")
    lines += ["", "example: llama-jax quickstart --workdir /tmp/qs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    mod = _load(name) if name in COMMANDS else None
    if mod is None:
        import difflib

        known = [n for n in COMMANDS if _load(n) is not None]
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"llama-jax: unknown command {name!r}{hint}; expected one of: {', '.join(known)}.", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog=f"llama-jax {name}",
        description=mod.HELP,
        epilog=f"example:\n  {mod.EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mod.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(mod.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
