"""Checkpoints to and from PyTorch (Meta's consolidated format, Hugging Face), orbax and GGUF (llama.cpp).

    cfg, params = load(path)                       # Meta, Hugging Face, orbax or GGUF, detected
    save(cfg, params, path, format="hf")           # "meta" | "hf" | "orbax" | "gguf"
    convert(src, dst, to="meta", num_shards=8)     # file to file, streaming
    convert(run_dir, "m.gguf", to="gguf", gguf_type="q8_0")   # for llama.cpp (see gguf.py)

`params` is the plain pytree that `Llama(cfg).apply({"params": params}, tokens)` accepts. Format
detection: a directory with `params.json` is Meta's, with `config.json` Hugging Face's, an orbax
checkpoint (run directory with `checkpoints/`, manager directory, or step directory) is orbax, a file
that starts with the GGUF magic is GGUF.

Everything streams tensor by tensor (see `common.py`): file-to-file conversion in any direction (Meta,
Hugging Face, orbax) holds at most about two copies of the largest tensor in host memory, not the model
(bench/bench_convert.py measures it). Into orbax each parameter is read, placed on the default device,
written by orbax's array handler and dropped before the next is read, and the result is the layout of a
plain `StandardSave` (see `orbax.py`). `save(..., format="orbax")` writes an in-memory pytree the same
way, one leaf at a time, so no staging copy of the model is made. Loading places each tensor on its
devices as soon as it is read, so host memory stays small when the devices are accelerators. Meta/HF
shards are read whole by every host that loads them; orbax restores onto a mesh read only each host's
chunks. Dtypes are kept as stored unless `dtype` asks for a cast. Bad input fails with a
`ConvertError` that names the file and the tensor.

gs:// (Cloud Storage, `llama_jax.storage`): orbax checkpoints are read in place (orbax reads buckets itself);
Meta, Hugging Face, GGUF and peft sources are downloaded into a temporary directory first (their readers —
torch.load, safetensors, gguf — need local files), and outputs to gs:// are written into a temporary local
directory and uploaded when complete, the file that makes the directory recognisable (config.json,
params.json, an orbax step's commit_success.txt) last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax import storage
from llama_jax.config import LlamaConfig
from llama_jax.convert.common import ConvertError, Source, TreeSource, dtype_name, flatten, key_str, np_dtype

__all__ = ["ConvertError", "FORMATS", "convert", "detect_format", "find_tokenizer", "load", "open_source",
           "restore_params", "save"]

FORMATS = ("meta", "hf", "orbax", "gguf")
TOKENIZER_FILES = ("tokenizer.model",)  # the tokenizer looked for beside a checkpoint (Meta's layout)


def detect_format(path: str | os.PathLike) -> str:
    """"meta", "hf" or "orbax" for a checkpoint directory, "gguf" for a GGUF file; a ConvertError otherwise."""
    from llama_jax.convert.gguf import is_gguf
    from llama_jax.convert.orbax import is_orbax

    p = storage.path(path)
    if not p.exists():
        raise ConvertError(f"{p}: no such file or directory.")
    if is_gguf(p):
        return "gguf"
    if p.is_file():
        raise ConvertError(f"{p}: expected a checkpoint directory (params.json + consolidated.NN.pth, config.json + "
                           f"*.safetensors, or an orbax checkpoint), got a file; pass its directory.")
    if (p / "params.json").is_file():
        return "meta"
    if (p / "config.json").is_file():
        return "hf"
    if is_orbax(p):
        return "orbax"
    raise ConvertError(f"{p}: not a checkpoint directory: no params.json (Meta), no config.json (Hugging Face), "
                       f"no orbax checkpoint steps.")


def open_source(path: str | os.PathLike) -> Source:
    """A streaming reader of the checkpoint at `path` (any format)."""
    fmt = detect_format(path)
    if fmt == "meta":
        from llama_jax.convert.meta import open_meta

        return open_meta(path)
    if fmt == "hf":
        from llama_jax.convert.hf import HFSource

        return HFSource(path)
    if fmt == "gguf":
        from llama_jax.convert.gguf import GGUFSource

        return GGUFSource(path)
    from llama_jax.convert.orbax import OrbaxSource

    return OrbaxSource(path)


def _place(x: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.device_put(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _shardings_for(src: Source, shardings: Any) -> dict:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return {k: shardings for k in src.keys()}
    import flax.linen as nn

    flat = flatten(nn.meta.unbox(shardings))
    missing = [k for k in src.keys() if k not in flat]
    if missing:
        raise ConvertError(f"shardings has no entry for parameter {key_str(missing[0])}; give one Sharding or a "
                           f"pytree shaped like the unrolled parameters (layers_0, layers_1, ...).")
    return flat


def load(path: str | os.PathLike, *, dtype: Any = None, shardings: Any = None,
         base: str | os.PathLike | None = None) -> tuple[LlamaConfig, Any]:
    """(LlamaConfig, params) of the checkpoint at `path` (Meta, Hugging Face or orbax, detected).

    A peft LoRA adapter directory (`adapter_config.json`) loads as its base model — `base`, or else the
    adapter's `base_model_name_or_path` — with the adapter merged in (W + scale·A·B, see `convert.peft`).

    `dtype` casts every parameter (default: as stored; `cfg.param_dtype` reports the result). `shardings`
    places the parameters: one `jax.sharding.Sharding` for all, or a pytree of them shaped like the
    parameters (unrolled layout for Meta/HF; the stored layout, `cfg.scan_layers`, for orbax, whose
    reads then fetch only what each host's devices hold). Default: the default device. Meta/HF tensors are
    read one at a time and placed before the next is read."""
    from llama_jax.convert.peft import is_peft

    if _needs_staging(path):
        with staged(path) as local:
            return load(local, dtype=dtype, shardings=shardings, base=base)
    if is_peft(path):
        return _load_peft(path, base, dtype=dtype, shardings=shardings)
    fmt = detect_format(path)
    if fmt == "orbax":
        from llama_jax.convert.orbax import load_orbax

        return load_orbax(path, dtype=dtype, shardings=shardings)
    dt = None if dtype is None else np_dtype(dtype)
    with open_source(path) as src:
        sh = _shardings_for(src, shardings)
        flat = {}
        for key in src.order():
            x = src.read(key)
            if dt is not None and x.dtype != dt:
                x = x.astype(dt)
            flat[key] = _place(np.ascontiguousarray(x), sh[key])
            del x
        cfg = src.cfg if dt is None else src.cfg.replace(param_dtype=dtype_name(dt))
    params: dict = {}
    for key in src.keys():  # nest in checkpoint order
        node = params
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = flat[key]
    return cfg, params


def _load_peft(path, base, *, dtype, shardings) -> tuple[LlamaConfig, Any]:
    from llama_jax.convert.peft import ADAPTER_CONFIG, load_adapter
    from llama_jax.lora import lora_scale, merge

    if base is None:
        import json

        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base or not Path(base).exists():
            raise ConvertError(f"{path}: the adapter's base_model_name_or_path ({base!r}) is not a local checkpoint "
                               f"directory; give the base weights (load(..., base=DIR) / --base DIR).")
    cfg, params = load(base, dtype=dtype, shardings=shardings)
    if cfg.scan_layers:
        from llama_jax.model import unstack_layers

        params, cfg = unstack_layers(params), cfg.replace(scan_layers=False)
    factors, s = load_adapter(path, cfg)
    return cfg, merge(params, factors, lora_scale(s["alpha"], s["rank"], s["rslora"]))


def save(cfg: LlamaConfig, params: Any, path: str | os.PathLike, format: str = "meta", num_shards: int = 1,
         dtype: Any = None, gguf_type: str = "f16", tokenizer: str | os.PathLike | None = None) -> Path:
    """Write `params` (the pytree of `Llama(cfg)`, either layer layout, boxed or not) to `path`.

    format "meta": params.json + `num_shards` model-parallel consolidated.NN.pth files; "hf": config.json +
    safetensors (`num_shards` files with an index when > 1); "orbax": a manager directory with step 0
    (`num_shards` must be 1); "gguf": one `.gguf` file of type `gguf_type` (f32, f16, bf16, q8_0, q4_0,
    q4_k_m) with `tokenizer` (the model's tokenizer.model) embedded. `dtype` casts on the way out. The
    output appears under `path` only when complete. `tokenizer` also goes along to "meta" (copied) and
    "hf" (written as the files transformers' `AutoTokenizer` loads, see `hf_tokenizer.py`, with a
    generation_config.json)."""
    if format not in FORMATS:
        raise ConvertError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}.")
    if storage.is_remote(path):
        return _to_bucket(lambda local: save(cfg, params, local, format=format, num_shards=num_shards, dtype=dtype,
                                             gguf_type=gguf_type, tokenizer=tokenizer), path)
    if format == "gguf":
        if num_shards != 1 or dtype is not None:
            raise ConvertError("GGUF output is one file whose tensor types gguf_type sets; num_shards and dtype "
                               "apply to the other formats.")
        if jax.process_count() > 1:
            raise ConvertError("save(format='gguf') writes one file from one process; in a multi-host run save to "
                               "orbax, then convert that checkpoint on one host.")
        from llama_jax.convert.gguf import write_gguf

        return write_gguf(TreeSource(cfg, params), path, gguf_type=gguf_type, tokenizer=tokenizer)
    if format == "orbax":
        from llama_jax.convert.orbax import save_orbax

        if num_shards != 1:
            raise ConvertError("num_shards applies to the meta and hf formats; orbax shards by itself.")
        return save_orbax(cfg, params, path, dtype=dtype)
    if jax.process_count() > 1:
        raise ConvertError(f"save(format={format!r}) writes files from one process; in a multi-host run save to "
                           f"orbax (every process calls it), then convert that checkpoint on one host.")
    return _write(TreeSource(cfg, params), path, format, num_shards, dtype, tokenizer)


def _write(src: Source, path: str | os.PathLike, format: str, num_shards: int, dtype: Any,
           tokenizer: str | os.PathLike | None) -> Path:
    if format == "meta":
        from llama_jax.convert.meta import write_meta

        return write_meta(src, path, num_shards=num_shards, dtype=dtype,
                          extra_files=(Path(tokenizer),) if tokenizer else ())
    from llama_jax.convert.hf import write_hf

    return write_hf(src, path, num_shards=num_shards, dtype=dtype, tokenizer=tokenizer)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, num_shards: int = 1, dtype: Any = None,
            scan_layers: bool = False, gguf_type: str = "f16", tokenizer: str | os.PathLike | None = None) -> Path:
    """Convert the checkpoint at `src` (any format) into format `to` at `dst`, tensor by tensor.

    Host memory stays near twice the largest tensor in every direction. To Meta/HF the tokenizer goes along
    (`find_tokenizer`: tokenizer.model beside `src`, or the one a training run's data was prepared with;
    from a GGUF source: written from its vocabulary): copied for Meta, written as transformers' tokenizer
    files for HF. To orbax each parameter is placed on the default device and written before the next is
    read; `scan_layers` stores the layers stacked (each stacked leaf assembled one layer at a time); a
    multi-host run converts on one host. To GGUF (`gguf_type`), the tokenizer is `tokenizer`, else
    `tokenizer.model` next to the checkpoint, else the one of the training run's data (see
    `gguf.find_tokenizer`)."""
    if to not in FORMATS:
        raise ConvertError(f"unknown format {to!r}; expected one of {', '.join(FORMATS)}.")
    kw = dict(num_shards=num_shards, dtype=dtype, scan_layers=scan_layers, gguf_type=gguf_type, tokenizer=tokenizer)
    if storage.is_remote(dst):
        return _to_bucket(lambda local: convert(src, local, to, **kw), dst)
    if _needs_staging(src):
        with staged(src) as local:
            return convert(local, dst, to, **kw)
    if scan_layers and to != "orbax":
        raise ConvertError("scan_layers (stacked layers) applies to orbax output only; Meta and HF files are per layer.")
    if to == "gguf":
        from llama_jax.convert.gguf import find_tokenizer as required_tokenizer, write_gguf

        if num_shards != 1 or dtype is not None:
            raise ConvertError("GGUF output is one file whose tensor types --gguf-type sets; --num-shards and "
                               "--dtype apply to the other formats.")
        tok = tokenizer if tokenizer is not None else required_tokenizer(src)
        with open_source(src) as source:
            return write_gguf(source, dst, gguf_type=gguf_type, tokenizer=tok)
    if detect_format(src) == "gguf":
        return _convert_from_gguf(src, dst, to, num_shards=num_shards, dtype=dtype, scan_layers=scan_layers)
    if to == "orbax":
        from llama_jax.convert.orbax import write_orbax

        if num_shards != 1:
            raise ConvertError("--num-shards applies to the meta and hf formats; orbax shards by itself.")
        with open_source(src) as source:
            return write_orbax(source, dst, dtype=dtype, scan_layers=scan_layers)
    tokenizer = find_tokenizer(src)
    with open_source(src) as source:
        return _write(source, dst, to, num_shards, dtype, tokenizer)


def _needs_staging(path: str | os.PathLike) -> bool:
    """A gs:// checkpoint that is not orbax (whose readers need local files)."""
    from llama_jax.convert.orbax import is_orbax

    return storage.is_remote(path) and not is_orbax(path)


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Any]:
    """`path` itself, or for a gs:// Meta/HF/GGUF/peft checkpoint a local temporary copy of it (removed on exit)."""
    if not _needs_staging(path):
        yield path
        return
    storage.check_bucket(path, write=False)
    if not storage.path(path).exists():
        raise ConvertError(f"{path}: no such file or directory.")
    with storage.local_copy(path) as local:
        yield local


def _to_bucket(write: Callable[[Path], Any], dst: str | os.PathLike) -> Any:
    """Run `write(local_dir)` into a temporary directory, then upload the result to gs:// `dst` (see the
    module docstring); `dst` must not exist yet, like a local output."""
    import tempfile

    storage.check_bucket(dst)
    target = storage.path(dst)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConvertError(f"output {dst} already exists and is not an empty directory; choose a new path.")
    with tempfile.TemporaryDirectory(prefix="llama-jax-convert-") as tmp:
        local = Path(tmp) / target.name
        out = Path(write(local))
        if out.is_file():  # a .gguf file
            storage.upload_file(out, target)
            return target
        from llama_jax.convert.orbax import COMMIT_MARKER

        # orbax on Cloud Storage counts a step as finished once its commit_success.txt exists: add the markers
        # a locally written (renamed into place) checkpoint lacks, and upload them last.
        markers = []
        for step in [d for d in out.iterdir() if d.is_dir() and d.name.isdigit()]:
            for d in [step, *(c for c in step.iterdir() if c.is_dir())]:
                (d / COMMIT_MARKER).write_text(f"Checkpoint commit was successful to {target / d.relative_to(out)}")
                markers.append(str((d / COMMIT_MARKER).relative_to(out)))
        last = [m for m in markers if m.count("/") == 2] + [m for m in markers if m.count("/") == 1]
        storage.upload_dir(out, target, last=["config.json", "params.json", *last])
    return target


def find_tokenizer(src: str | os.PathLike) -> Path | None:
    """The tokenizer that goes with the checkpoint at `src`: `tokenizer.model` beside it, else, for a training
    run, the one its data manifest records (`llama_jax.tokenizer.run_tokenizer`); None if there is none."""
    from llama_jax.tokenizer import run_tokenizer

    beside = [storage.path(src) / f for f in TOKENIZER_FILES if (storage.path(src) / f).is_file()]
    if beside:
        return beside[0]
    try:
        return run_tokenizer(src)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _convert_from_gguf(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, num_shards: int, dtype: Any,
                      scan_layers: bool) -> Path:
    import tempfile

    from llama_jax.convert.gguf import GGUFSource, write_tokenizer
    from llama_jax.convert.orbax import write_orbax

    with open_source(src) as source, tempfile.TemporaryDirectory() as tmp:
        assert isinstance(source, GGUFSource)
        tok = write_tokenizer(source.reader, Path(tmp), str(src))
        if to == "orbax":
            if num_shards != 1:
                raise ConvertError("--num-shards applies to the meta and hf formats; orbax shards by itself.")
            out = write_orbax(source, dst, dtype=dtype, scan_layers=scan_layers)
            if tok is not None:  # beside the checkpoint steps, where `llama-jax generate --tokenizer` can find it
                shutil.copyfile(tok, Path(out) / tok.name)
            return out
        return _write(source, dst, to, num_shards, dtype, tok)


def restore_params(path: str | os.PathLike, cfg: LlamaConfig, shardings: Any = None) -> Any:
    """Parameters of an orbax model checkpoint for `cfg` (its layout and param dtype) on `shardings`;
    see `llama_jax.convert.orbax.restore_params`."""
    from llama_jax.convert.orbax import restore_params as _restore

    return _restore(path, cfg, shardings)
