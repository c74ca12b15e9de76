"""Checkpoints: an orbax `CheckpointManager` directory (`run_dir/checkpoints/`), one sub-directory per step.

Each step directory holds five items:

    params        the parameter pytree (`ocp.args.StandardSave`), in the layout of llama_config.scan_layers
    opt_state     the optimizer state pytree (StandardSave)
    llama_config  `LlamaConfig.to_dict()` (JsonSave) — so `llama_jax.convert.load` can read the weights alone
    data          the data iterators' states (JsonSave): {"count": n, "states": [state of block 0..n-1]}
    meta          {"step": ..., "run_config": ..., "process_count": ...} (JsonSave)

Why this is crash-safe: orbax writes a step into a temporary directory and renames it into place only when
every host has finished (an atomic rename on POSIX file systems), so a crash or SIGKILL mid-save leaves a
`*.orbax-checkpoint-tmp-*` directory that is never mistaken for a checkpoint (and is removed at the next
start), while the previous checkpoints stay untouched. Old checkpoints are deleted only after a newer one
is complete (keep the last N, plus every K-th step if asked).

Saves are asynchronous: `save` returns once device arrays are copied to host memory; files are written in a
background thread while training continues. Restore places every array directly onto the current mesh
(the shardings of the abstract target), so a run can resume on a different mesh or device count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from llama_jax import storage
from llama_jax.config import LlamaConfig
from llama_jax.convert.orbax import architecture_diff, failed_restores_are_quiet, short_error

ITEMS = ("params", "opt_state", "llama_config", "data", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written; the message names the directory and what to do."""


def _abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what StandardRestore places arrays onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a host-level all-gather of the encoded bytes)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everything[i, : lengths[i]]).decode()) for i in range(len(lengths))]


class Checkpointer:
    """The run's checkpoint directory. Every process must call `save`/`restore` at the same steps."""

    def __init__(self, directory: str | Path, *, keep_last: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = storage.absolute(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} exists but is not a directory.")
        policies: list[Any] = [ocm.LatestN(n=keep_last)]
        if keep_every:
            policies.append(ocm.EveryNSteps(interval_steps=keep_every))
        # `read_only` opens for reading without orbax's read-only mode (which logs warnings on every open):
        # nothing is created or cleaned up, and this class never saves through a read-only instance.
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; the user needs the path
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {type(e).__name__}: {e}") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, llama_config: LlamaConfig, data_states: list[Any], meta: dict) -> None:
        """Save `state` (a TrainState) at `step`. `data_states`: one iterator state per data block, already
        gathered (see `allgather_json`); the same on every process."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only.")
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            llama_config=ocp.args.JsonSave(llama_config.to_dict()),
            data=ocp.args.JsonSave({"count": len(data_states), "states": data_states}),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        self.manager.save(int(step), args=args, force=True)

    def restore(self, step: int, abstract_state: Any, state_shardings: Any,
                model: LlamaConfig | None = None) -> tuple[Any, dict, dict]:
        """(state placed on the shardings, data item, meta item) of checkpoint `step`. With `model`, a checkpoint
        written for another architecture is refused first, the differing fields named."""
        step_dir = self.directory / str(step)
        if model is not None:
            self._check_model(step, model)
        try:
            with failed_restores_are_quiet():
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(_abstract(abstract_state.params, state_shardings.params)),
                    opt_state=ocp.args.StandardRestore(_abstract(abstract_state.opt_state,
                                                                 state_shardings.opt_state)),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {step_dir} cannot be restored ({type(e).__name__}: {short_error(e)}). It is damaged or was "
                f"written for a different model/optimizer; move it away to resume from an earlier step "
                f"(others here: {self.all_steps()}), or use a new run_dir."
            ) from e
        state = abstract_state.replace(
            step=jax.device_put(np.asarray(restored["meta"]["step"], np.int32), state_shardings.step),
            params=restored["params"], opt_state=restored["opt_state"])
        return state, dict(restored["data"] or {}), dict(restored["meta"] or {})

    def stored_model(self, step: int) -> LlamaConfig:
        """The LlamaConfig checkpoint `step` was written for (its `llama_config` item)."""
        return LlamaConfig.from_dict(self.manager.restore(step, args=ocp.args.Composite(
            llama_config=ocp.args.JsonRestore()))["llama_config"])

    def _check_model(self, step: int, model: LlamaConfig) -> None:
        try:
            stored = self.stored_model(step)
        except Exception:  # noqa: BLE001 - unreadable: the restore that follows names the damage
            return
        diff = architecture_diff(stored, model)
        if diff:
            fields = ", ".join(f"{f} {a!r} there, {b!r} in this config" for f, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {self.directory / str(step)} was written for another model ({fields}); "
                                  f"resume with the run's model settings, or use a new run_dir.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def pick_data_state(data_item: dict, block_index: int, block_count: int) -> Any:
    """This process's iterator state from a checkpoint's `data` item, given the current data layout."""
    states = data_item.get("states") or []
    if not states:
        raise CheckpointError("checkpoint has no data-iterator state; it was not written by this trainer.")
    if len(states) == block_count:
        return states[block_index]
    if all(s == states[0] for s in states):
        return states[0]
    raise CheckpointError(
        f"the checkpoint's data state was saved by {len(states)} data-loading processes and this run has "
        f"{block_count}; resume with the same number of hosts (or data×fsdp layout) to continue the data stream."
    )


def find_manager_dir(path: str | Path) -> tuple[Path, int | None]:
    """A run dir, a checkpoint manager dir or a step dir (local or gs://) → (manager dir, step or None for the
    latest)."""
    p = storage.absolute(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist.")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", None
    if p.name.isdigit() and (p / "params").exists():
        return p.parent, int(p.name)
    if any(c.name.isdigit() for c in p.iterdir() if c.is_dir()):
        return p, None
    raise CheckpointError(f"{p} is not a run directory, a checkpoint directory or a checkpoint step directory "
                          f"(no checkpoints/ sub-directory, no numbered step directories).")


def open_checkpoint(path: str | Path) -> tuple[Checkpointer, int, LlamaConfig]:
    """A run dir, manager dir or step dir → (read-only Checkpointer, step, the checkpoint's LlamaConfig)."""
    manager_dir, step = find_manager_dir(path)
    ck = Checkpointer(manager_dir, read_only=True)
    step = ck.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{manager_dir} holds no finished checkpoint.")
    try:
        cfg = ck.stored_model(step)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {manager_dir / str(step)} has no readable llama_config item "
                              f"({type(e).__name__}: {short_error(e)}); it is damaged or not written by llama-jax.") from e
    return ck, step, cfg


def load_params(ck: Checkpointer, step: int, abstract: Any, shardings: Any) -> Any:
    """The `params` item of checkpoint `step`, placed directly onto `shardings` (shapes from `abstract`)."""
    try:
        with failed_restores_are_quiet():
            return ck.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(abstract, shardings))))["params"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {ck.directory / str(step)}: parameters cannot be read "
                              f"({type(e).__name__}: {short_error(e)}); it may be damaged or incomplete.") from e


def run_dir_of(path: str | Path) -> Path | None:
    """The training run directory a checkpoint path belongs to (the one holding config.yaml), if any."""
    manager_dir, _ = find_manager_dir(path)
    run = manager_dir.parent
    return run if manager_dir.name == "checkpoints" and (run / "config.yaml").is_file() else None
