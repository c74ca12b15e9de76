"""orbax model checkpoints: the layout `llama-jax train` writes and starts from.

A model checkpoint is an orbax `CheckpointManager` directory; each step directory holds the items

    params        the parameter pytree (`ocp.args.StandardSave`), in the layout of llama_config.scan_layers
    llama_config  `LlamaConfig.to_dict()` (`ocp.args.JsonSave`)

plus whatever else the trainer adds (`opt_state`, `data`, ...), which is ignored here. Reading accepts a
training run directory (with `checkpoints/`), a manager directory (its latest step) or one step directory.
`write_orbax` (from any checkpoint) and `save_orbax` (from a parameter pytree) write a manager directory
with the single step 0, one parameter at a time (see "save" below), under a temporary name renamed when
complete, so a crash leaves nothing behind, never a partial checkpoint.

Restoring onto a mesh (`restore_params`, or `load(..., shardings=...)`) hands orbax the target shardings,
so each host reads only the chunks its own devices hold. Streaming export (`OrbaxSource`) restores one
parameter at a time into host memory (a partial restore); with stacked layers it restores one stacked
leaf (all layers of, say, wq) at a time. Streaming import (`write_orbax`) holds about two copies of the
largest leaf it writes (a stacked one with `scan_layers`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from llama_jax import storage
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.convert.common import (
    ConvertError,
    Key,
    Source,
    atomic_dir,
    cast,
    check_tree,
    dtype_name,
    expected_tree_shapes,
    flatten,
    key_str,
    layer_index,
    np_dtype,
    scanned_order,
    stacked_key,
    stacked_parts,
)

ITEMS = ("params", "llama_config")
# Fields that change the function a checkpoint computes (the rest are runtime choices).
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "norm_eps", "rope_theta",
               "rope_scaling", "tie_embeddings",
               # attention variants (Mistral's window, Llama 4's chunks, NoPE layers, QK norm, temperature)
               "sliding_window", "attention_chunk_size", "nope_interval", "qk_norm", "attn_temperature_tuning",
               "attn_floor_scale", "attn_scale")
# mixture of experts (Mixtral, Llama 4): compared only where a model has experts (n_experts, always compared)
MOE_FIELDS = ("experts_per_token", "moe_router", "moe_shared_expert", "moe_interleave", "expert_hidden")
ARCH_FIELDS += ("n_experts",) + MOE_FIELDS


def architecture_diff(stored: LlamaConfig, wanted: LlamaConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (stored, wanted)} for the `ARCH_FIELDS` on which two configs differ (the MoE ones only where
    either has experts)."""
    dense = stored.n_experts == 0 and wanted.n_experts == 0
    return {f: (getattr(stored, f), getattr(wanted, f)) for f in ARCH_FIELDS
            if getattr(stored, f) != getattr(wanted, f) and not (dense and f in MOE_FIELDS)}


def _is_abandoned_read(unraisable) -> bool:
    """Whether an unraisable exception is the echo of a read that a failed orbax restore left in flight."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True  # the read's coroutine, closed unfinished when collected
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    # A TensorStore callback thread reporting a finished read to the event loop orbax has already closed.
    return (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
            and tb is not None and "asyncio" in tb.tb_frame.f_code.co_filename)


class _DropTaskNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # A collected coroutine ("Task ..."), a TensorStore read future ("Future ...") or orbax's gather of
        # them ("_GatheringFuture ...") whose error nobody awaited: orbax stopped awaiting when the restore failed.
        return not str(record.msg).partition("\n")[0].endswith("exception was never retrieved")


_QUIETED = False


def _drop_abandoned_read_reports() -> None:
    """Drop, from now on, exactly the reports of reads a failed orbax restore abandons (process-wide, once).

    orbax reads every array concurrently (`asyncio.gather` over TensorStore futures) and, when one read
    fails, raises at once and closes its event loop while the other reads are still in flight. Nothing
    outside orbax can reach those reads: each later reports into the closed loop from a TensorStore thread
    ("Event loop is closed", possibly while the error is still propagating, so this is installed before a
    restore starts), and its coroutine complains when collected ("Task exception was never retrieved",
    TensorStore spec dumps) — tracebacks after the one-line error. A restore that succeeds produces neither."""
    global _QUIETED
    if not _QUIETED:
        import sys

        previous = sys.unraisablehook
        sys.unraisablehook = lambda u: None if _is_abandoned_read(u) else previous(u)
        logging.getLogger("asyncio").addFilter(_DropTaskNoise())
        _QUIETED = True


@contextlib.contextmanager
def failed_restores_are_quiet():
    """Around an orbax restore: if it raises, nothing of the reads it abandoned reaches the user (see
    `_drop_abandoned_read_reports`). Their reports can come from TensorStore's threads while the error is
    still propagating, so stderr (the file descriptor) is held aside during the restore: replayed as it
    was when the restore succeeds, dropped when it fails, after the abandoned reads were given a moment to
    finish and their coroutines were collected, so nothing of them is left to print at exit either."""
    import sys
    import tempfile
    import time

    _drop_abandoned_read_reports()
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except Exception:
            failed = True
            for _ in range(3):
                time.sleep(0.1)
                gc.collect()
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                text = held.read()
                while text:
                    text = text[os.write(2, text):]


def short_error(e: BaseException, limit: int = 300) -> str:
    """The first line of an orbax/TensorStore error, with the underlying cause instead of the spec dump that
    orbax appends ("See full TensorStore details: ...")."""
    text = str(e).split(" See full TensorStore details")[0].strip()
    first = text.splitlines()[0] if text else type(e).__name__
    cause = e.__cause__
    if cause is not None and " See full TensorStore details" in str(e):
        cause_text = str(cause).strip().splitlines()
        first += f" ({cause_text[0] if cause_text else type(cause).__name__})"
    return first if len(first) <= limit else first[:limit] + "..."


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


COMMIT_MARKER = "commit_success.txt"  # orbax's "this step is complete" object on Cloud Storage


def _is_step_dir(p: Path) -> bool:
    return (p / "params").is_dir()


def _steps(p: Path) -> list[Path]:
    # Finished steps only: orbax writes "<step>.orbax-checkpoint-tmp-*" and renames it to "<step>" when done;
    # on gs:// (no rename) it writes the step in place and marks it finished with commit_success.txt.
    remote = storage.is_remote(p)
    return [c for c in p.iterdir() if c.is_dir() and c.name.isdigit() and _is_step_dir(c)
            and (not remote or (c / COMMIT_MARKER).exists())] if p.is_dir() else []


def is_orbax(path: str | os.PathLike) -> bool:
    p = storage.path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    return p.is_dir() and (_is_step_dir(p) or bool(_steps(p)))


def find_step_dir(path: str | os.PathLike) -> Path:
    """A run directory, a manager directory (→ its latest finished step) or a step directory → the step directory."""
    p = storage.absolute(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if _is_step_dir(p):
        return p
    steps = _steps(p)
    if not steps:
        raise ConvertError(f"{path}: no finished orbax checkpoint step here (expected a run directory with "
                           f"checkpoints/, a checkpoint manager directory with numbered steps, or a step directory "
                           f"holding params/).")
    return max(steps, key=lambda c: int(c.name))


def read_config(step_dir: Path) -> LlamaConfig:
    item = step_dir / "llama_config"
    if not item.exists():
        raise ConvertError(f"{step_dir}: no llama_config item; model checkpoints written by llama-jax "
                           f"(train or convert) store the model's config next to params.")
    ocp = _ocp()
    try:
        d = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)
        return LlamaConfig.from_dict(d)
    except ConfigError as e:
        raise ConvertError(f"{item}: {e}") from None
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds
        raise ConvertError(f"{item}: cannot read the model config ({type(e).__name__}: {e}).") from None


@contextlib.contextmanager
def _quiet_absl():
    """Reading an item directory directly makes orbax warn that the step's metadata file is not inside it
    (it is one level up, where it belongs); the warning is noise here."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _metadata(step_dir: Path) -> dict[Key, Any]:
    ocp = _ocp()
    try:
        with _quiet_absl():
            md = ocp.PyTreeCheckpointer().metadata(step_dir / "params")
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{step_dir / 'params'}: cannot read the checkpoint's metadata, it may be damaged or "
                           f"incomplete ({type(e).__name__}: {e}).") from None
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    return flatten(tree)


def _check_metadata(cfg: LlamaConfig, meta: dict[Key, Any], where: Path) -> None:
    want = expected_tree_shapes(cfg)
    for k, shape in want.items():
        if k not in meta:
            raise ConvertError(f"{where}: parameter {key_str(k)} is missing (llama_config describes "
                               f"{cfg.n_layers} layers, scan_layers={cfg.scan_layers}).")
        if tuple(meta[k].shape) != shape:
            raise ConvertError(f"{where}: parameter {key_str(k)} has shape {tuple(meta[k].shape)}, llama_config "
                               f"expects {shape}.")
    for k in meta:
        if k not in want:
            raise ConvertError(f"{where}: unexpected parameter {key_str(k)} (llama_config describes "
                               f"{cfg.n_layers} layers, scan_layers={cfg.scan_layers}).")


def _nest(flat: dict[Key, Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        for part in k[:-1]:
            node = node.setdefault(part, {})
        node[k[-1]] = v
    return out


class OrbaxSource(Source):
    """An orbax model checkpoint read one parameter at a time into host memory."""

    def __init__(self, path: str | os.PathLike):
        self.step_dir = find_step_dir(path)
        self.location = str(self.step_dir)
        self.cfg = read_config(self.step_dir)
        self.meta = _metadata(self.step_dir)
        _check_metadata(self.cfg, self.meta, self.step_dir / "params")
        self._ckptr = _ocp().PyTreeCheckpointer()
        self._cached: tuple[Key, np.ndarray] | None = None

    def _stored(self, key: Key) -> tuple[Key, int | None]:
        return stacked_key(self.cfg, key)

    def order(self) -> list[Key]:
        return scanned_order(self.cfg) if self.cfg.scan_layers else self.keys()

    def dtype(self, key: Key) -> np.dtype:
        return np_dtype(self.meta[self._stored(key)[0]].dtype)

    def _restore(self, stored: Key) -> np.ndarray:
        ocp = _ocp()
        m = self.meta[stored]
        item = _nest({stored: jax.ShapeDtypeStruct(tuple(m.shape), np_dtype(m.dtype))})
        args = _nest({stored: ocp.RestoreArgs(restore_type=np.ndarray)})
        try:
            with failed_restores_are_quiet():
                out = self._ckptr.restore(self.step_dir / "params", args=ocp.args.PyTreeRestore(
                    item=item, restore_args=args, partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{self.step_dir / 'params'}: cannot read parameter {key_str(stored)} "
                               f"({type(e).__name__}: {short_error(e)}).") from None
        return np.asarray(flatten(out)[stored])

    def read(self, key: Key) -> np.ndarray:
        stored, i = self._stored(key)
        if i is None:
            return self._restore(stored)
        if self._cached is None or self._cached[0] != stored:
            self._cached = None  # drop the previous stacked leaf before reading the next
            self._cached = (stored, self._restore(stored))
        x = self._cached[1][i].copy()
        if i == self.cfg.n_layers - 1:
            self._cached = None
        return x

    def close(self) -> None:
        self._cached = None


# ------------------------------------------------------------------------------------------------ restore


def _abstract(cfg: LlamaConfig, meta: dict[Key, Any], dtype: Any, shardings: Any) -> dict:
    flat_sh = _flat_shardings(cfg, shardings)
    flat = {k: jax.ShapeDtypeStruct(tuple(m.shape), np_dtype(dtype or m.dtype), sharding=flat_sh[k])
            for k, m in meta.items()}
    return _nest(flat)


def _flat_shardings(cfg: LlamaConfig, shardings: Any) -> dict[Key, Any]:
    keys = list(expected_tree_shapes(cfg))
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {k: dev for k in keys}
    if isinstance(shardings, jax.sharding.Sharding):
        return {k: shardings for k in keys}
    import flax.linen as nn

    flat = flatten(nn.meta.unbox(shardings))
    missing = [k for k in keys if k not in flat]
    if missing:
        raise ConvertError(f"shardings has no entry for parameter {key_str(missing[0])}; give one Sharding or a "
                           f"pytree with the parameters' structure (scan_layers={cfg.scan_layers}).")
    return flat


def load_orbax(path: str | os.PathLike, *, dtype: Any = None, shardings: Any = None) -> tuple[LlamaConfig, Any]:
    """(cfg, params) of an orbax model checkpoint, params in the stored layout (cfg.scan_layers), placed on
    `shardings` (one Sharding or a pytree of them; default: the first local device)."""
    step_dir = find_step_dir(path)
    cfg = read_config(step_dir)
    meta = _metadata(step_dir)
    _check_metadata(cfg, meta, step_dir / "params")
    target = _abstract(cfg, meta, dtype, shardings)
    ocp = _ocp()
    try:
        with failed_restores_are_quiet():
            params = ocp.StandardCheckpointer().restore(step_dir / "params", target)
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{step_dir / 'params'}: cannot restore the parameters ({type(e).__name__}: "
                           f"{short_error(e)}); the checkpoint may be damaged.") from None
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype_name(dtype))
    return cfg, params


def restore_params(path: str | os.PathLike, cfg: LlamaConfig, shardings: Any = None) -> Any:
    """The parameters of an orbax model checkpoint for the model `cfg`: in `cfg.scan_layers`'s layout, as
    `cfg.param_dtype`, placed on `shardings` (pytree matching that layout, or one Sharding). Each host reads
    only the chunks its devices hold. The checkpoint's architecture must equal `cfg`'s; its layer layout
    may differ (it is stacked or unstacked on the way)."""
    step_dir = find_step_dir(path)
    stored = read_config(step_dir)
    diff = architecture_diff(stored, cfg)
    if diff:
        raise ConvertError(f"{step_dir}: the checkpoint's model differs from the requested one "
                           f"(field: checkpoint vs requested) {diff}.")
    if stored.scan_layers == cfg.scan_layers:
        return load_orbax(step_dir, dtype=cfg.param_dtype, shardings=shardings)[1]
    from llama_jax.model import stack_layers, unstack_layers

    want = _flat_shardings(cfg, shardings)
    # Shardings for the stored layout, derived from the wanted ones (drop or add the leading layer axis).
    have: dict[Key, Any] = {}
    for k in expected_tree_shapes(stored):
        if k[0] == "layers":  # stored stacked, wanted unrolled: the stack gets its first layer's sharding plus an L axis
            have[k] = _with_layer_axis(want[stacked_parts(stored, k)[0]], add=True)
        elif layer_index(k) is not None:  # stored unrolled, wanted stacked
            have[k] = _with_layer_axis(want[stacked_key(cfg, k)[0]], add=False)
        else:
            have[k] = want[k]
    _, params = load_orbax(step_dir, dtype=cfg.param_dtype, shardings=_nest(have))
    convert = functools.partial(stack_layers, period=cfg.layer_period) if cfg.scan_layers else unstack_layers
    out_sh = _nest(want)
    return jax.jit(convert, out_shardings=out_sh)(params)


def _with_layer_axis(sharding: Any, add: bool) -> Any:
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None, *spec) if add else spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


# ------------------------------------------------------------------------------------------------ save
#
# Writing streams: the params item is saved from placeholder leaves (`_Pending`: a parameter's shape
# and dtype, one element of memory), and a type handler for them produces each parameter only when
# its turn comes, hands it to orbax's own jax.Array handler (the one a plain `StandardSave` uses), waits
# for that write, and drops it before producing the next. The item therefore has the layout of a
# `StandardSave` of jax.Arrays (same `_METADATA`, `_sharding`, array metadata and OCDBT storage, only
# committed in more, smaller transactions), and the step's metadata names the standard handler, so
# `StandardRestore`, `restore_params` and the trainer read it as any other. Host memory holds one
# parameter at a time (two copies while it moves from host to device, then orbax's compressed
# copy), instead of the whole tree plus orbax's staging copy of it.


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the system. orbax compresses a leaf in worker threads, whose heap
    arenas keep the freed buffers (about the compressed size of the leaf) otherwise, and the next leaf's
    host array would be allocated on top of them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Pending(np.ndarray):
    """A params leaf written later: its parameter's shape and dtype, zero strides (one element of memory)."""


def _pending(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype), shape).view(_Pending)


def _info_key(info: Any) -> Key:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in info.keypath)


@functools.cache
def _streaming_classes() -> tuple[type, type]:
    """(type handler for `_Pending` leaves, StandardCheckpointHandler that routes them to it); built on
    first use so that importing this module does not import orbax."""
    import asyncio

    ocp = _ocp()

    class StreamingArrayHandler(ocp.type_handlers.TypeHandler):
        """Writes `_Pending` leaves one at a time through orbax's jax.Array handler, in `rank` order.
        `produce(key)` returns the parameter as a jax.Array (written as it is, with its sharding) or a
        host array (placed on the default device first)."""

        def __init__(self, produce: Callable[[Key], Any], rank: dict[Key, int]):
            self._produce, self._rank = produce, rank
            self._arrays = ocp.type_handlers.get_type_handler(jax.Array)

        def typestr(self) -> str:
            return self._arrays.typestr()  # recorded as "jax.Array", so restoring needs nothing of ours

        async def metadata(self, infos):
            return await self._arrays.metadata(infos)

        async def deserialize(self, infos, args=None):
            return await self._arrays.deserialize(infos, args)

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            jobs = sorted(zip(infos, args), key=lambda job: self._rank[_info_key(job[0])])

            async def write_one_by_one():
                for info, arg in jobs:
                    x = self._produce(_info_key(info))
                    arr = x if isinstance(x, jax.Array) else jax.device_put(x).block_until_ready()
                    del x
                    gc.collect(1)  # placing leaves the host array in a reference cycle: free it before writing
                    futures = await self._arrays.serialize([arr], [info], [arg])
                    del arr  # the write holds what it needs until it is done
                    while futures:
                        await asyncio.to_thread(futures.pop().result)
                    gc.collect(1)
                    _release_freed_memory()

            return [ocp.future.CommitFutureAwaitingContractedSignals(write_one_by_one(),
                                                                     name="llama_jax_streaming_save")]

    class StreamingStandardHandler(ocp.StandardCheckpointHandler):
        """A StandardCheckpointHandler whose saves go through `StreamingArrayHandler`; it records itself
        as the standard handler, whose restore reads what it writes."""

        @classmethod
        def typestr(cls) -> str:
            return ocp.StandardCheckpointHandler.typestr()

        def __init__(self, produce: Callable[[Key], Any], rank: dict[Key, int]):
            super().__init__()
            registry = ocp.type_handlers.create_type_handler_registry(
                (_Pending, StreamingArrayHandler(produce, rank)),
                (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # its array metadata store
            )
            # The options StandardCheckpointHandler gives its own PyTreeCheckpointHandler.
            self._streaming = ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96,
                                                          use_ocdbt=True, type_handler_registry=registry)

        async def async_save(self, directory, item=None, save_args=None, args=None):
            return await self._streaming.async_save(directory, args=ocp.args.PyTreeSave(item=args.item))

        def finalize(self, directory) -> None:
            self._streaming.finalize(directory)

        def close(self) -> None:
            self._streaming.close()
            super().close()

    return StreamingArrayHandler, StreamingStandardHandler


def _save_streaming(cfg: LlamaConfig, leaves: dict[Key, tuple[tuple[int, ...], np.dtype]],
                    produce: Callable[[Key], Any], order: list[Key], directory: Path) -> None:
    """Write a manager directory with step 0 (params + llama_config) at `directory`; `leaves` gives each
    parameter's shape and dtype, `produce(key)` the parameter itself, `order` the order to write in."""
    ocp = _ocp()
    _, handler_cls = _streaming_classes()
    rank = {k: i for i, k in enumerate(order)}
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("params", ocp.args.StandardSave, handler_cls(produce, rank))
    registry.add("llama_config", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    tree = _nest({k: _pending(shape, dtype) for k, (shape, dtype) in leaves.items()})
    mngr = ocp.CheckpointManager(directory, handler_registry=registry)
    try:
        mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                             llama_config=ocp.args.JsonSave(cfg.to_dict())))
        mngr.wait_until_finished()
    finally:
        mngr.close()


def write_orbax(src: Source, path: str | os.PathLike, *, dtype: Any = None, scan_layers: bool = False) -> Path:
    """Stream the checkpoint `src` into an orbax model checkpoint at `path`, one parameter at a time (read,
    placed on the default device, written, dropped), stacked per layer kind when `scan_layers` (a stacked
    leaf is assembled one layer at a time). Host memory: about twice the largest leaf written."""
    if jax.process_count() > 1:
        raise ConvertError("converting into orbax runs in one process; run the conversion on one host.")
    dt = None if dtype is None else np_dtype(dtype)
    cfg = src.cfg.replace(scan_layers=scan_layers)
    if dt is not None:
        cfg = cfg.replace(param_dtype=dtype_name(dt))

    def parts(stored: Key) -> list[Key]:  # the source keys a stored leaf is made of
        return stacked_parts(cfg, stored)

    leaves = {k: (shape, dt or src.dtype(parts(k)[0])) for k, shape in expected_tree_shapes(cfg).items()}
    # Write in the order the source reads best; a stacked leaf where its first layer comes.
    order = list(dict.fromkeys(stacked_key(cfg, k)[0] for k in src.order()))

    def produce(stored: Key) -> np.ndarray:
        if stored[0] != "layers":
            return cast(src.read(stored), dt)
        out = np.empty(*leaves[stored])
        for i, k in enumerate(parts(stored)):
            out[i] = src.read(k)
        return out

    with atomic_dir(path) as tmp:
        _save_streaming(cfg, leaves, produce, order, tmp)
    return Path(path)


def save_orbax(cfg: LlamaConfig, params: Any, path: str | os.PathLike, dtype: Any = None) -> Path:
    """Write `params` (in `cfg.scan_layers`'s layout) as an orbax model checkpoint: a manager directory with
    step 0, cast to `dtype` if given. In one process the leaves are written one at a time, each as it is
    (sharding included) and the output appears at `path` only when complete; in a multi-host run every
    process must call it, and orbax saves the sharded tree in one step."""
    import flax.linen as nn

    params = nn.meta.unbox(params)
    check_tree(cfg, params, "params")
    dt = None if dtype is None else np_dtype(dtype)
    if dt is not None:
        cfg = cfg.replace(param_dtype=dtype_name(dt))
    dst = Path(path).absolute()
    if jax.process_count() == 1:
        flat = flatten(params)

        def produce(key: Key) -> Any:
            x = flat[key]
            return x if dt is None or x.dtype == dt else x.astype(dt)

        leaves = {k: (tuple(x.shape), dt or np.dtype(x.dtype)) for k, x in flat.items()}
        with atomic_dir(dst) as tmp:
            _save_streaming(cfg, leaves, produce, list(expected_tree_shapes(cfg)), tmp)
        return dst
    ocp = _ocp()
    if dt is not None:
        params = jax.tree.map(lambda x: x.astype(dt), params)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConvertError(f"output {dst} already exists and is not an empty directory; choose a new path.")
    mngr = ocp.CheckpointManager(dst, item_names=ITEMS)
    try:
        mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             llama_config=ocp.args.JsonSave(cfg.to_dict())))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return dst
