"""The training loop: plain Python around the jitted step.

    mesh → sharded state (fresh, `init_from`, or resumed from run_dir/checkpoints) → for each step:
    next batch → train_step → metrics → (eval) → (checkpoint) → stop on SIGTERM/SIGINT or a non-finite loss.

Exact resume: the state (params, optimizer, step) and the data iterator's state are checkpointed together,
the step is a deterministic function of (state, batch), so a run killed at any point and restarted from
its last checkpoint reproduces the uninterrupted run's losses bit for bit (on the same mesh and backend).
"""

from __future__ import annotations

import functools

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import storage
from llama_jax_train import checkpoint as ckpt_lib
from llama_jax_train import data as data_lib
from llama_jax_train import sharding as sh
from llama_jax.config import LlamaConfig
from llama_jax_train.config import RunConfig
from llama_jax_train.metrics import MetricsLogger, Throughput, flops_per_token, peak_source, total_peak_flops
from llama_jax_train.optim import learning_rate_schedule, make_optimizer
from llama_jax_train.step import BATCH_KEYS, TrainState, init_state, make_eval_step, make_train_step

EXIT_OK = 0
EXIT_NONFINITE = 3


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class _StopSignals:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the end of the current step and exits.
    A second SIGINT (Ctrl-C twice) interrupts immediately."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _Profiler:
    """`logging.profile: {start_step: S, steps: K}`: a `jax.profiler` trace of steps S .. S+K-1 (counted from 1)
    written to `directory` (TensorBoard's profile plugin or Perfetto read it). Every process traces its own
    devices; the files are named after the host. The profiler writes local files only: for a gs:// directory
    the trace goes to a local temporary directory and is uploaded when it ends."""

    def __init__(self, directory: Any, window: dict | None, say: Callable[[str], None]):
        self.directory, self.say = directory, say
        self._staging: Any = None
        self.first = window["start_step"] if window else None
        self.last = window["start_step"] + window["steps"] - 1 if window else None
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            if storage.is_remote(self.directory):
                import tempfile

                self._staging = tempfile.TemporaryDirectory(prefix="llama-jax-profile-")
                target = self._staging.name
            else:
                target = str(storage.makedirs(self.directory))
            jax.profiler.start_trace(target)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step == self.last:
            self.close()
            self.say(f"profile of steps {self.first}-{self.last} written to {self.directory}")

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            if self._staging is not None:
                storage.upload_dir(self._staging.name, self.directory)
                self._staging.cleanup()
                self._staging = None


def _any_process(flag: bool) -> bool:
    """True on every process if it is true on any (a signal may reach only some hosts)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).max())


@dataclasses.dataclass
class Setup:
    """Everything the loop, `--dry-run` and `llama-jax eval` share: mesh, optimizer, shardings, jitted steps."""

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    tx: Any
    schedule: Callable
    abstract_state: TrainState  # unboxed ShapeDtypeStructs
    logical: Any  # logical axis names per parameter
    state_shardings: TrainState
    batch_shardings: dict
    train_step: Callable  # jitted, state donated
    eval_step: Callable  # jitted
    data_block: tuple[int, int]  # (index, count): which slice of the global batch this process loads


def setup(cfg: RunConfig, devices: list | None = None) -> Setup:
    """Build everything for `cfg` on `devices` (default: all devices of all processes)."""
    mesh = sh.make_mesh(cfg.mesh.shape, devices, dcn=cfg.mesh.dcn)
    sh.check_batch(cfg.train.global_batch_size, cfg.train.micro_batches, mesh)
    tx = make_optimizer(cfg.optim)
    schedule = learning_rate_schedule(cfg.optim)
    boxed = jax.eval_shape(partial(init_state, cfg.model, tx, lora=cfg.lora), jax.random.key(0))
    state_shardings = sh.shardings_for(boxed, mesh)
    from flax.linen import meta

    abstract_state = meta.unbox(boxed)
    logical = sh.logical_axes_of(boxed.params)
    batch_shardings = {k: sh.batch_sharding(mesh) for k in BATCH_KEYS}
    t = cfg.train
    step_fn = make_train_step(cfg.model, tx, schedule, micro_batches=t.micro_batches, z_loss=t.z_loss,
                              loss_chunk=t.loss_chunk, skip_nonfinite=True, mesh=mesh,
                              param_shardings=state_shardings.params, lora=cfg.lora, seed=t.seed)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                         out_shardings=(state_shardings, sh.replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(cfg.model, loss_chunk=t.loss_chunk, mesh=mesh, lora=cfg.lora),
                        in_shardings=(state_shardings.params, batch_shardings, state_shardings.frozen),
                        out_shardings=sh.replicated(mesh))
    data_block = sh.process_rows(mesh, t.global_batch_size)
    return Setup(cfg, mesh, tx, schedule, abstract_state, logical, state_shardings, batch_shardings, train_step,
                 eval_step, data_block)


def fresh_state(s: Setup) -> TrainState:
    """A new state born sharded: `jax.jit(init, out_shardings=...)`, nothing whole on one host."""
    from flax.linen import meta

    init = jax.jit(lambda k: meta.unbox(init_state(s.cfg.model, s.tx, k, s.cfg.lora)), out_shardings=s.state_shardings)
    return init(jax.random.key(s.cfg.train.seed))


def lora_base_weights(s: Setup) -> Any:
    """LoRA's frozen base, placed on its shardings: `train.init_from` (any format `load_weights` reads), or
    the seed's random init (the same weights `fresh_state` made, so a resumed run gets them back)."""
    from flax.linen import meta

    from llama_jax.model import Llama
    from llama_jax_train.step import lora_base

    cfg, lo = s.cfg, s.cfg.lora
    if not cfg.train.init_from:
        init = jax.jit(lambda k: meta.unbox(lora_base(cfg.model, lo, Llama(cfg.model).init(k, jnp.zeros((1, 1), jnp.int32))["params"])),
                       out_shardings=s.state_shardings.frozen)
        return init(jax.random.key(cfg.train.seed))
    dense = jax.eval_shape(lambda: jax.tree.map(lambda x: x.astype(lo.base_dtype or cfg.model.param_dtype),
                                                Llama(cfg.model).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    params, _ = load_weights(cfg.train.init_from, cfg.model.replace(param_dtype=lo.base_dtype or cfg.model.param_dtype),
                             meta.unbox(dense), sh.shardings_for(dense, s.mesh))
    if lo.quantize == "none":
        return params
    return jax.jit(lambda p: lora_base(cfg.model, lo, p), out_shardings=s.state_shardings.frozen)(params)


def load_weights(path: str, model: LlamaConfig, abstract_params: Any, shardings: Any) -> tuple[Any, LlamaConfig]:
    """Parameters for `model` from `path`, placed on `shardings`: an orbax checkpoint of this trainer (run,
    manager or step directory; restored straight onto the mesh), or any format `llama_jax.convert.load`
    reads (Meta, Hugging Face; loaded on the host, then placed). Returns (params, the source's config)."""
    from llama_jax.model import stack_layers, unstack_layers

    p = storage.path(path)
    if not p.exists():
        raise TrainingError(f"weights {path} do not exist.")
    try:
        ck, step, src = ckpt_lib.open_checkpoint(p)
    except ckpt_lib.CheckpointError:
        ck = None
    if ck is None:
        try:
            from llama_jax import convert
        except ImportError as e:
            raise TrainingError(f"{path} is not a llama-jax checkpoint and weight conversion (llama_jax.convert) "
                                f"is unavailable: {e}") from None
        # Meta / Hugging Face tensors are placed on their devices one at a time, in the unrolled layout.
        unrolled = model.replace(scan_layers=False)
        from llama_jax.model import param_shapes

        mesh = jax.tree.leaves(shardings)[0].mesh
        try:
            src, params = convert.load(str(p), dtype=model.param_dtype,
                                       shardings=sh.shardings_for(param_shapes(unrolled), mesh))
        except convert.ConvertError as e:
            raise TrainingError(str(e)) from None
    arch = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "tie_embeddings")
    diff = {k: (getattr(src, k), getattr(model, k)) for k in arch if getattr(src, k) != getattr(model, k)}
    if diff:
        raise TrainingError(f"weights {path} are for a different model (field: theirs vs config) {diff}; "
                            f"make the model section match them.")
    if ck is not None:
        if src.scan_layers == model.scan_layers:
            return ckpt_lib.load_params(ck, step, abstract_params, shardings), src
        host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        their_shapes = jax.eval_shape(lambda: (functools.partial(stack_layers, period=model.layer_period) if src.scan_layers else unstack_layers)(
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params)))
        params = ckpt_lib.load_params(ck, step, their_shapes, jax.tree.map(lambda _: host, their_shapes))
    if src.scan_layers and not model.scan_layers:
        params = unstack_layers(params)
    elif model.scan_layers and not src.scan_layers:
        params = stack_layers(params, model.layer_period)
    params = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), params, abstract_params)
    return jax.device_put(params, shardings), src


def state_from_pretrained(s: Setup, path: str) -> TrainState:
    """Step 0 with weights from `path` (see `load_weights`) and a fresh optimizer state: fine-tuning or
    continued pretraining. With LoRA the weights become the frozen base, and the factors start fresh."""
    if s.cfg.lora is not None:
        return fresh_state(s).replace(frozen=lora_base_weights(s))
    params, _ = load_weights(path, s.cfg.model, s.abstract_state.params, s.state_shardings.params)
    opt_init = jax.jit(s.tx.init, out_shardings=s.state_shardings.opt_state)
    step = jax.device_put(np.zeros((), np.int32), s.state_shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_init(params))


def evaluate(s: Setup, params: Any, n_batches: int, process_block: tuple[int, int] | None = None,
             frozen: Any = None) -> dict[str, Any]:
    """Held-out loss over the first `n_batches` batches of the eval stream (the same batches every time)."""
    cfg = s.cfg
    index, count = process_block or s.data_block
    it = data_lib.make_iterator(cfg.data, global_batch_size=cfg.train.global_batch_size, seed=cfg.train.seed,
                                vocab_size=cfg.model.vocab_size, split="eval", process_index=index,
                                process_count=count)
    loss_sum, tokens = 0.0, 0.0
    try:
        for _ in range(n_batches):
            try:
                local = next(it)
            except StopIteration:
                break
            out = jax.device_get(s.eval_step(params, sh.global_batch(local, s.mesh, cfg.train.global_batch_size),
                                             frozen))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
    finally:
        getattr(it, "close", lambda: None)()
    if tokens == 0:
        return {}
    loss = loss_sum / tokens
    bpb = data_lib.bits_per_byte(loss, data_lib.bytes_per_token(cfg.data))
    rec = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(tokens)}
    if bpb is not None:
        rec["eval_bits_per_byte"] = bpb
    return rec


def _check_data(cfg: RunConfig) -> None:
    if cfg.data.synthetic:
        return
    data_lib.check_data(cfg.data, "path")
    if cfg.data.eval_path is not None:
        data_lib.check_data(cfg.data, "eval_path")
    vocab = data_lib.data_vocab_size(cfg.data)
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise data_lib.DataError(f"the data's tokenizer has {vocab} tokens but model.vocab_size is "
                                 f"{cfg.model.vocab_size}; set model.vocab_size >= {vocab}.")


def train(cfg: RunConfig, *, log: Callable[[str], None] | None = None, prepared: Setup | None = None) -> int:
    """Run (or resume) the training run described by `cfg`; returns the process exit status.

    `prepared`: the `setup(cfg)` already built (e.g. by preflight, whose memory check compiled its step), so
    the step is not compiled a second time."""
    primary = jax.process_index() == 0
    say = log or (lambda text: print(text, flush=True))
    if not primary:
        say = lambda text: None  # noqa: E731
    run_dir = storage.path(cfg.run_dir)
    storage.check_bucket(run_dir)  # a gs:// run_dir: bucket, credentials and permission, before any work
    if cfg.train.init_from:
        storage.check_bucket(cfg.train.init_from, write=False)
    _check_data(cfg)
    if prepared is not None and prepared.cfg != cfg:
        raise TrainingError("the prepared setup was built for another run config; pass the Setup of this one.")
    s = prepared if prepared is not None else setup(cfg)
    t = cfg.train
    say(f"mesh {dict(s.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); run_dir {run_dir}")

    # Check first, write after: the data stream, the checkpoint to resume (or the weights to start from) and
    # the first batch are all in hand before run_dir, its config.yaml or checkpoints/ are created or changed,
    # so a run that cannot start leaves no trace and a resume that fails keeps the run's config.yaml.
    block_index, block_count = s.data_block
    train_iter = data_lib.make_iterator(cfg.data, global_batch_size=t.global_batch_size, seed=t.seed,
                                        vocab_size=cfg.model.vocab_size, split="train",
                                        process_index=block_index, process_count=block_count)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_kw = dict(keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                   async_save=cfg.checkpoint.async_save)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, **ckpt_kw) if ckpt_dir.is_dir() else None
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None:
        state, data_item, _ = ckpt.restore(latest, s.abstract_state, s.state_shardings, cfg.model)
        if cfg.lora is not None:  # checkpoints hold the adapters; the base comes from where it came from
            state = state.replace(frozen=lora_base_weights(s))
        try:
            train_iter.set_state(ckpt_lib.pick_data_state(data_item, block_index, block_count))
        except ValueError as e:  # the data-loader refuses a state made for other data or settings
            raise ckpt_lib.CheckpointError(f"checkpoint {ckpt.directory / str(latest)}: cannot resume the data "
                                           f"stream: {e}.") from None
        start = latest
        say(f"resumed from {ckpt.directory / str(latest)}")
    elif t.init_from:
        state = state_from_pretrained(s, t.init_from)
        start = 0
        say(f"initialised weights from {t.init_from}")
    else:
        state = fresh_state(s)
        start = 0
    local = next(train_iter) if start < t.steps else None
    data_state = train_iter.get_state()
    if primary:
        storage.makedirs(run_dir)
        storage.write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
    if ckpt is None:
        ckpt = ckpt_lib.Checkpointer(ckpt_dir, **ckpt_kw)

    counts = param_counts(s)
    n_params = counts["total_params"]
    if cfg.lora is not None:
        say(f"LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {counts['trainable_params']:,} trainable of "
            f"{counts['total_params']:,} parameters ({100 * counts['trainable_params'] / counts['total_params']:.3f}%)"
            + ("; base in NF4" if cfg.lora.quantize == "nf4" else ""))
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    fpt_causal = flops_per_token(cfg.model, cfg.data.seq_len, causal=True)
    peak = total_peak_flops(cfg.logging.peak_flops)
    say(f"model {n_params / 1e6:.2f}M parameters; {fpt / 1e6:.1f} MFLOPs/token; "
        f"{cfg.tokens_per_step} tokens/step; peak {peak / 1e12:.2f} TFLOP/s "
        f"({peak_source(cfg.logging.peak_flops)})")

    metrics = MetricsLogger(run_dir, total_steps=t.steps, start_step=start, enabled=primary,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
    if log is None and primary:
        say = metrics.print  # while a progress bar is drawn, lines go above it instead of onto its line
    status = EXIT_OK
    saved_step = latest
    skipped = 0

    def save(step: int, data_state: Any) -> None:
        nonlocal saved_step
        states = ckpt_lib.allgather_json([block_index, data_state])
        by_block = {b: st for b, st in states}
        metrics.flush()  # every metrics line up to this step is durable before the checkpoint that keeps it
        ckpt.save(step, state, cfg.model, [by_block[b] for b in range(block_count)],
                  {"run_config": cfg.to_dict(), "process_count": jax.process_count()})
        saved_step = step

    profiler = _Profiler(run_dir / "profile", cfg.logging.profile, say)
    try:
        with _StopSignals() as signals:
            throughput = Throughput()
            compile_t0 = time.perf_counter()
            for step in range(start, t.steps):
                done = step + 1
                profiler.before(done)
                batch = sh.global_batch(local, s.mesh, t.global_batch_size)
                state, m = s.train_step(state, batch)
                step_data_state = data_state
                if done < t.steps:  # load the next batch while the device computes this step
                    local = next(train_iter)
                    data_state = train_iter.get_state()
                m = jax.device_get(m)  # waits for the step: a profile window ends with its last step's work
                profiler.after(done)
                loss, finite = float(m["loss"]), bool(m["finite"])
                if done == start + 1:
                    say(f"first step (compilation included) took {time.perf_counter() - compile_t0:.1f}s")
                    throughput = Throughput()
                else:
                    throughput.add(cfg.tokens_per_step)
                if not finite:
                    skipped += 1
                    what = (f"step {done}: non-finite loss {loss} / grad norm {float(m['grad_norm'])}; "
                            f"this update was not applied")
                    if t.on_nonfinite == "stop":
                        metrics.log({"step": done, "loss": loss, "grad_norm": float(m["grad_norm"]),
                                     "lr": float(m["lr"]), "nonfinite": True}, console=False)
                        last = f"the last good checkpoint is step {saved_step}" if saved_step is not None \
                            else "no checkpoint was written yet"
                        say(f"error: {what}; stopping (train.on_nonfinite=stop); {last}, intact in "
                            f"{ckpt.directory}. Lower optim.lr, lengthen optim.warmup_steps, or set "
                            f"train.on_nonfinite=skip to drop such steps.")
                        status = EXIT_NONFINITE
                        break
                    say(f"warning: {what} (train.on_nonfinite=skip; {skipped} skipped so far).")
                metrics.advance(1, loss=loss)
                if done % cfg.logging.log_every == 0 or done == t.steps or done == start + 1:
                    tps, step_time = throughput.report() if throughput.steps else (float("nan"), float("nan"))
                    rec = {"step": done, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                           "tokens_per_s": tps, "step_time_s": step_time,
                           "mfu": tps * fpt / peak if math.isfinite(tps) else None,
                           "mfu_causal": tps * fpt_causal / peak if math.isfinite(tps) else None,
                           "tokens": done * cfg.tokens_per_step}
                    if done == start + 1:
                        rec.update(counts)
                    if t.z_loss:
                        rec["z_loss"] = float(m["z_loss"])
                    if cfg.model.n_experts:  # dropless dispatch: no token is ever dropped
                        rec.update(router_aux_loss=float(m["router_aux_loss"]), router_z_loss=float(m["router_z_loss"]),
                                   expert_load=[round(float(x), 5) for x in m["expert_load"]])
                    if skipped:
                        rec["skipped"] = skipped
                    metrics.log(rec)
                if t.eval_batches and ((t.eval_every and done % t.eval_every == 0) or done == t.steps):
                    ev = evaluate(s, state.params, t.eval_batches, frozen=state.frozen)
                    if ev:
                        metrics.log({"step": done, **ev})
                    throughput = Throughput()  # evaluation time is not training throughput
                stop = _any_process(signals.received is not None)
                every = cfg.checkpoint.every
                if stop or done == t.steps or (every and done % every == 0):
                    save(done, step_data_state)
                if stop:
                    ckpt.wait()
                    say(f"received {signals.received or 'a stop signal on another host'} at step {done}: "
                        f"checkpoint saved to {ckpt.directory / str(done)}; run the same command to resume.")
                    break
    finally:
        profiler.close()
        metrics.close()
        ckpt.close()
        getattr(train_iter, "close", lambda: None)()
    if status == EXIT_OK and saved_step == t.steps:
        say(f"done: {t.steps} steps; final checkpoint {ckpt.directory / str(t.steps)}")
    return status


def param_counts(s: Setup) -> dict[str, int]:
    """{"trainable_params", "total_params"}: what the optimizer updates, and the model's own count (for
    LoRA: base + factors)."""
    from llama_jax.model import count_params

    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params))
    total = trainable + (count_params(s.cfg.model) if s.cfg.lora is not None else 0)
    return {"trainable_params": trainable, "total_params": total}


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def compile_step(s: Setup, lowering_platforms: tuple[str, ...] | None = None) -> tuple[Any, float]:
    """The train step compiled ahead of time for the mesh, from abstract inputs (nothing allocated, no data
    read), and the seconds it took. `s.train_step` keeps the executable: training with `s` does not compile
    the step again. `lowering_platforms=("tpu",)` compiles for a mesh of TPU devices from another host
    (`llama_jax_train.topology`)."""
    abstract = jax.tree.map(lambda x, shd: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd),
                            s.abstract_state, s.state_shardings)
    b, t = s.cfg.train.global_batch_size, s.cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=s.batch_shardings[k]) for k in BATCH_KEYS}
    t0 = time.perf_counter()
    if lowering_platforms is None:
        compiled = s.train_step.lower(abstract, batch).compile()
    else:
        compiled = s.train_step.trace(abstract, batch).lower(lowering_platforms=lowering_platforms).compile()
    return compiled, time.perf_counter() - t0


def step_memory(compiled: Any) -> tuple[dict[str, int], int] | None:
    """XLA's per-device memory analysis of a compiled step: ({field: bytes} for `MEMORY_FIELDS`, the bytes it
    needs = arguments + outputs - donated aliases + temporaries), or None when the backend gives none."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    vals = {f: int(getattr(mem, f, 0) or 0) for f in MEMORY_FIELDS}
    need = vals["argument_size_in_bytes"] + vals["output_size_in_bytes"] - vals["alias_size_in_bytes"] + \
        vals["temp_size_in_bytes"]
    return vals, need


def dry_run(cfg: RunConfig, out=None) -> int:
    """Compile the train step ahead of time for the configured mesh and print memory, FLOPs and the sharding
    of every parameter — without allocating the model or reading data."""
    s = setup(cfg)
    t = cfg.train
    compiled, compile_s = compile_step(s)
    out = out or sys.stdout
    p = lambda text="": print(text, file=out)  # noqa: E731
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params))
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
    counts = param_counts(s)
    if cfg.lora is not None:
        n_params = counts["total_params"]
        size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.2f}M"
        size += (f" ({counts['trainable_params']:,} trainable: LoRA rank {cfg.lora.rank} on {cfg.lora.targets}"
                 + (", base in NF4" if cfg.lora.quantize == "nf4" else "") + ")")
    p(f"dry run: {size} parameters, mesh {dict(s.mesh.shape)} over {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}); compiled in {compile_s:.1f}s")
    mem = step_memory(compiled)
    if mem is not None:
        gib = 1024**3
        vals, peak = mem
        p("per-device memory (GiB): " + ", ".join(f"{f.replace('_size_in_bytes', '')} {v / gib:.3f}"
                                                   for f, v in vals.items()) + f"; total ≈ {peak / gib:.3f}")
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    analytic = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.tokens_per_step
    p(f"FLOPs per step: model (6N + 12LHQT) {analytic:.3e} in all, {analytic / jax.device_count():.3e} per device; "
      f"XLA cost analysis {xla_flops:.3e} per device (it counts a scanned layer or micro-batch loop once)")
    p(f"tokens per step {cfg.tokens_per_step}; micro-batches {t.micro_batches}; "
      f"data blocks {s.data_block[1]} (processes loading distinct rows)")
    p("parameter shardings (path, shape, dtype, logical axes -> mesh axes):")
    for line in sh.describe(s.abstract_state.params, s.state_shardings.params, s.logical):
        p("  " + line)
    return 0
