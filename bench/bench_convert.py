"""Checkpoint conversion: peak host memory and seconds, on a generated checkpoint of a real model size.

A random bfloat16 checkpoint with the shapes of a preset (default `llama3.2-1b`: 1.24B parameters,
2.5 GB; its largest tensor, the 128256 x 2048 embedding, is 0.53 GB) is written in Meta's format under
`--workdir`, then each conversion runs in a fresh process that reports its own peak RSS (`ru_maxrss`,
which counts file-backed pages too) and the RSS it had right after importing jax/torch/orbax (the
constant). The claim under test: file-to-file conversion, into orbax included, needs ~2x the largest
tensor above that constant, whatever the model size. Loading into JAX on a CPU host holds the model once
(on CPU the devices' memory *is* host memory), which the table shows for contrast, and saving those
loaded parameters to orbax adds about one tensor on top (orbax writes them one at a time).

    python bench/bench_convert.py --workdir /tmp/convert-bench        (or: llama-jax bench convert ...)

Generated files are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HELP = "checkpoint conversion: peak RSS vs model size and seconds (Meta <-> HF, orbax, load)"
EXAMPLE = "llama-jax bench convert --preset llama3.2-1b --workdir /tmp/convert-bench"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="llama3.2-1b", help="model shapes to generate (default llama3.2-1b)")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a new dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--save", action="store_true", help="append the results to bench/results/<device>.md")


# ------------------------------------------------------------------------------------------ child side


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(op: str, args: list[str]) -> None:
    """Run one operation and print {"seconds", "peak_rss", "base_rss"} as JSON."""
    import resource

    import jax
    import numpy as np
    import orbax.checkpoint  # noqa: F401  (imported up front: part of the constant, not of the conversion)
    import torch  # noqa: F401

    from llama_jax import convert as cv
    from llama_jax.config import get_preset
    from llama_jax.convert.common import Source, key_str, np_dtype

    jax.devices()
    base = _rss_now()
    t0 = time.perf_counter()
    if op == "generate":
        preset, out = args

        class RandomSource(Source):
            """Random bf16 tensors with a preset's shapes, made one at a time."""

            def __init__(self, cfg):
                self.cfg, self.location = cfg.replace(param_dtype="bfloat16"), "random"

            def dtype(self, key):
                return np_dtype("bfloat16")

            def read(self, key):
                rng = np.random.default_rng(zlib.crc32(key_str(key).encode()))
                return (rng.standard_normal(self.shape(key), dtype=np.float32) * 0.02).astype(np_dtype("bfloat16"))

        from llama_jax.convert.meta import write_meta

        write_meta(RandomSource(get_preset(preset)), out)
    elif op == "convert":
        src, dst, to, shards = args
        cv.convert(src, dst, to, num_shards=int(shards))
    elif op == "load":
        (src,) = args
        cfg, params = cv.load(src)
        jax.block_until_ready(params)
    elif op == "load+save":
        src, dst, to = args
        cfg, params = cv.load(src)
        cv.save(cfg, params, dst, format=to)
    else:
        raise SystemExit(f"unknown op {op}")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "base_rss": base}))


# ----------------------------------------------------------------------------------------- parent side


def _run(op: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", op, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    if out.returncode:
        raise SystemExit(f"{op} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(a) -> int:
    from llama_jax.config import get_preset
    from llama_jax.convert.common import param_table

    cfg = get_preset(a.preset)
    table = param_table(cfg)
    n_params = sum(int(__import__("numpy").prod(s)) for s in table.values())
    model_bytes, largest = 2 * n_params, 2 * max(int(__import__("numpy").prod(s)) for s in table.values())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="convert-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    meta, hf, meta2, ob, hf2, ob2 = (work / n for n in ("meta", "hf", "meta2", "orbax", "hf2", "orbax2"))
    for p in (meta, hf, meta2, ob, hf2, ob2):
        shutil.rmtree(p, ignore_errors=True)
    GB = 1e9
    results: dict[str, dict] = {}
    try:
        steps = [
            ("generate Meta checkpoint", lambda: _run("generate", a.preset, meta), meta),
            ("Meta -> HF", lambda: _run("convert", meta, hf, "hf", 1), hf),
            ("HF -> Meta (2 shards)", lambda: _run("convert", hf, meta2, "meta", 2), meta2),
            ("HF -> orbax", lambda: _run("convert", hf, ob, "orbax", 1), ob),
            ("orbax -> HF", lambda: _run("convert", ob, hf2, "hf", 1), hf2),
            ("load HF into JAX (CPU)", lambda: _run("load", hf), None),
            ("load HF, save orbax (CPU)", lambda: _run("load+save", hf, ob2, "orbax"), ob2),
        ]
        for name, fn, out in steps:
            r = fn()
            r["output_bytes"] = _du(out) if out is not None else 0
            results[name] = r
            print(f"{name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / GB:.2f} GB "
                  f"(+{(r['peak_rss'] - r['base_rss']) / GB:.2f} GB over {r['base_rss'] / GB:.2f} GB after imports)",
                  file=sys.stderr, flush=True)
            if out in (meta2, hf2, ob2):
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = [("model", f"{a.preset}: {n_params / 1e9:.3f}B params, bf16 {model_bytes / GB:.2f} GB; "
                      f"largest tensor {largest / GB:.3f} GB")]
    for name, r in results.items():
        extra = r["peak_rss"] - r["base_rss"]
        rows.append((name, f"{r['seconds']:6.1f} s   peak RSS {r['peak_rss'] / GB:5.2f} GB = {r['base_rss'] / GB:.2f} "
                           f"+ {extra / GB:5.2f} GB ({extra / largest:4.1f}x largest tensor, "
                           f"{extra / model_bytes:4.2f}x model)"))
    record = {"preset": a.preset, "params": n_params, "model_bytes": model_bytes, "largest_tensor_bytes": largest,
              "steps": results}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llama_jax_bench.report import emit

    emit("checkpoint conversion", rows, record, save=a.save)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
    else:
        parser = argparse.ArgumentParser(description=HELP)
        add_arguments(parser)
        sys.exit(main(parser.parse_args()))
