"""The device mesh, the ONE logical-axis rule table, and sharded initialisation.

The model tags every parameter and the block-boundary activations with logical axis names (`vocab`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, `layers`, `batch`, `length`). `LOGICAL_AXIS_RULES`
below is the only place that says which mesh axis each name is split over:

- `data`   : pure data parallelism — parameters replicated, the batch split.
- `fsdp`   : data parallelism with parameters, gradients and optimizer state split along `embed`
             (ZeRO-3 / FSDP); weights are all-gathered per layer by the compiler.
- `tensor` : Megatron-style tensor parallelism — heads, MLP hidden units and vocabulary split, the
             residual stream replicated across it.
- `expert` : expert parallelism for mixture-of-experts models (Mixtral, Llama 4) — the routed experts'
             weights (and the router's columns) split by expert. The mesh has this fourth axis only
             when a size is given for it (`make_mesh((d, f, t, e))`, `mesh.expert` in a run config);
             tokens are not split over it, and the dispatch (`llama_jax.moe.grouped_swiglu`, per device in
             shard_map) gathers the expert weights whole, so the axis splits their storage (weights,
             gradients, optimizer state), not their work.

Rules are tried in order and a mesh axis is used at most once per array (flax's logical-axis semantics),
so an activation (batch, length, embed) takes `('data', 'fsdp')` for `batch` and leaves `embed` whole,
while a weight (embed, mlp) takes `fsdp` for `embed` and `tensor` for `mlp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
EXPERT_AXIS = "expert"  # the optional innermost mesh axis (mixture-of-experts models)
# Multislice (several TPU slices joined by the data-center network): one more, outermost axis of pure data
# parallelism across slices, so that only the gradient all-reduce crosses the slow network. The mesh has it
# only when `mesh.dcn` > 1; `rules_for(mesh)` drops it from the table otherwise.
DCN_AXIS = "dcn"
BATCH_AXES = (DCN_AXIS, "data", "fsdp")  # the mesh axes the batch dimension is split over

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),  # sequence parallelism would map this; not used yet
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("expert", "expert"),  # dropped where the mesh has no `expert` axis
    ("lora_rank", None),  # LoRA factors: A (inputs..., r), B (r, outputs...) split like their kernel
)


class ShardingError(ValueError):
    """A mesh or sharding that cannot work; the message names the axis/parameter and the sizes."""


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Replace at most one -1 in `shape` by the devices left over; check the product equals `n_devices`."""
    shape = tuple(int(s) for s in shape)
    axes = MESH_AXES + (EXPERT_AXIS,) if len(shape) == len(MESH_AXES) + 1 else MESH_AXES
    if len(shape) != len(axes):
        raise ShardingError(f"mesh needs {len(MESH_AXES)} sizes {MESH_AXES} (or a 4th, {EXPERT_AXIS!r}), got {shape}.")
    if any(s == 0 or s < -1 for s in shape):
        raise ShardingError(f"mesh sizes must be positive or -1 (\"the rest\"), got {dict(zip(axes, shape))}.")
    if shape.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {dict(zip(axes, shape))}.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ShardingError(
                f"mesh {dict(zip(axes, shape))}: the fixed axes multiply to {known}, which does not divide "
                f"the {n_devices} devices, so -1 has no integer size."
            )
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ShardingError(
            f"mesh {dict(zip(axes, shape))} has {math.prod(shape)} devices but {n_devices} are available; "
            f"the sizes must multiply to the device count (use -1 for one axis to take the rest)."
        )
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[Any] | None = None, dcn: int = 1) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices of all processes),
    and an outermost 'dcn' axis of size `dcn` (one entry per slice) when `dcn` > 1.

    Device order comes from `jax.make_mesh`, which lays axes along the physical interconnect (ICI rings on
    TPU); the last axis (`tensor`) varies fastest, so tensor-parallel groups are neighbours. Where that order
    would give a process rows of the batch that are not one contiguous block (a 64-chip fsdp ring through
    16 hosts of a v5p slice), and always across slices, devices are laid out process by process instead
    (`_process_blocked`, the equivalent of `mesh_utils.create_hybrid_device_mesh(process_is_granule=True)`):
    each host's chips stay neighbours on the innermost axes, slices follow each other along 'dcn'."""
    devices = list(jax.devices() if devices is None else devices)
    if dcn < 1 or len(devices) % dcn:
        raise ShardingError(f"mesh.dcn={dcn} (slices) must be a positive divisor of the {len(devices)} devices.")
    shape = resolve_mesh_shape(shape, len(devices) // dcn)
    axes = MESH_AXES + (EXPERT_AXIS,) if len(shape) > len(MESH_AXES) else MESH_AXES
    names, full = (axes, shape) if dcn == 1 else ((DCN_AXIS, *axes), (dcn, *shape))
    types = (AxisType.Auto,) * len(names)
    if dcn == 1:
        mesh = jax.make_mesh(full, names, axis_types=types, devices=devices)
        if _rows_contiguous(mesh):
            return mesh
    blocked = _process_blocked(full, devices)
    if blocked is None:
        raise ShardingError(f"mesh {dict(zip(names, full))}: the devices of each process cannot form one block of "
                            f"it (each process has {len(devices) // len({d.process_index for d in devices})}); "
                            f"choose sizes whose innermost axes hold a whole number of processes' devices.")
    return Mesh(blocked, names, axis_types=types)


def _rows_contiguous(mesh: Mesh) -> bool:
    """Whether every process's devices cover one contiguous run of positions along the batch axes."""
    lead = sum(1 for name in mesh.axis_names if name in BATCH_AXES)
    grid = mesh.devices.reshape(math.prod(mesh.devices.shape[:lead]), -1)  # (batch positions, the rest)
    spans: dict[int, list[int]] = {}
    for row, devices in enumerate(grid):
        for d in devices:
            spans.setdefault(d.process_index, []).append(row)
    return all(max(rows) - min(rows) + 1 == len(set(rows)) for rows in spans.values())


def _process_blocked(shape: tuple[int, ...], devices: list[Any]) -> np.ndarray | None:
    """`devices` as an array of `shape` in which each process's devices fill one block of the innermost axes,
    and processes follow each other in (slice, process) order along the outer axes. None when the process's
    device count does not factor into the innermost axes."""
    by_process: dict[int, list[Any]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    local = {len(v) for v in by_process.values()}
    if len(local) != 1:
        return None
    left, inner = local.pop(), [1] * len(shape)
    for i in reversed(range(len(shape))):  # the process's devices take the innermost axes first
        inner[i] = math.gcd(left, shape[i])
        left //= inner[i]
    if left != 1:
        return None
    outer = [s // i for s, i in zip(shape, inner)]
    order = sorted(by_process, key=lambda p: (getattr(by_process[p][0], "slice_index", 0) or 0, p))
    out = np.empty(shape, dtype=object)
    for n, p in enumerate(order):
        at = np.unravel_index(n, outer)
        block = tuple(slice(a * i, (a + 1) * i) for a, i in zip(at, inner))
        out[block] = np.array(sorted(by_process[p], key=lambda d: d.id), dtype=object).reshape(inner)
    return out


def rules_for(mesh: Mesh | None) -> tuple[tuple[str, Any], ...]:
    """`LOGICAL_AXIS_RULES` with the mesh axes that `mesh` lacks (`dcn` on a single slice) left out."""
    if mesh is None:
        return LOGICAL_AXIS_RULES
    present = set(mesh.axis_names)

    def keep(target):
        if target is None or isinstance(target, str):
            return target if target is None or target in present else None
        kept = tuple(t for t in target if t in present)
        return kept or None

    return tuple((name, keep(target)) for name, target in LOGICAL_AXIS_RULES)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over on this mesh."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def logical_to_spec(logical: Sequence[str | None] | None, mesh: Mesh | None = None) -> PartitionSpec:
    """The mesh PartitionSpec for an array with these logical axis names, under `LOGICAL_AXIS_RULES` (for
    `mesh`'s axes when given)."""
    if logical is None:
        return PartitionSpec()
    return nn.logical_to_mesh_axes(tuple(logical), rules_for(mesh))


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def check_divisible(path: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, logical=None) -> None:
    """Raise ShardingError naming `path` if a dimension is not divisible by the mesh axes it is split over."""
    for i, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        size = _axis_size(mesh, entry)
        if dim % size:
            name = f" ({logical[i]!r})" if logical else ""
            raise ShardingError(
                f"{path}: dimension {i}{name} of size {dim} is split over mesh axis {entry!r} of size {size}, which "
                f"does not divide it. Change the mesh (e.g. a smaller 'tensor'/'fsdp') or the model size."
            )


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shardings_for(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of (possibly abstract) arrays boxed with logical partitioning metadata.

    Leaves without metadata (e.g. optimizer step counters) are replicated. Every split dimension is checked
    for divisibility first."""
    specs = nn.get_partition_spec(boxed_tree)  # logical names per leaf (PartitionSpec of names)
    values = nn.meta.unbox(boxed_tree)

    def one(path, value, logical):
        logical = tuple(logical) if logical is not None else ()
        spec = logical_to_spec(logical, mesh) if logical else PartitionSpec()
        check_divisible(_path_str(path), value.shape, spec, mesh, logical or None)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, values, specs,
                                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_axes_of(boxed_tree: Any) -> Any:
    """The logical axis names of each leaf (a tuple), for reports such as `--dry-run`."""
    return jax.tree.map(lambda s: tuple(s), nn.get_partition_spec(boxed_tree),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> tuple[Any, Any]:
    """Run `init_fn(*args)` (which returns boxed parameters) with its outputs born sharded.

    `jax.eval_shape` gives shapes and logical axes without allocating; the rule table turns them into
    NamedShardings; `jax.jit(..., out_shardings=...)` then creates every shard on its own device, so nothing
    full-size is materialised on one host. Returns (plain arrays, shardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = shardings_for(abstract, mesh)

    def unboxed(*a):
        return nn.meta.unbox(init_fn(*a))

    values = jax.jit(unboxed, out_shardings=shardings)(*args)
    return values, shardings


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over ('dcn', 'data', 'fsdp'), everything else whole — matches the `batch` rule."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(global_batch_size: int, micro_batches: int, mesh: Mesh) -> None:
    """The batch is split over data×fsdp, and each device's rows again into `micro_batches` micro-batches."""
    shards = _axis_size(mesh, batch_axes(mesh))
    if global_batch_size % (shards * micro_batches):
        raise ShardingError(
            f"train.global_batch_size={global_batch_size} must be divisible by {'×'.join(batch_axes(mesh))} "
            f"({shards}) × "
            f"train.micro_batches ({micro_batches}) = {shards * micro_batches}."
        )


def process_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """Which slice of the global batch this process must load, as (index, count) of equal contiguous blocks.

    A process needs the rows of every device it owns; processes whose devices hold the same rows (tensor
    parallelism across hosts) load the same block. Single-process: (0, 1)."""
    sharding = batch_sharding(mesh)
    index_map = sharding.devices_indices_map((global_batch_size, 1))
    per_process: dict[int, set[tuple[int, int]]] = {}
    for device, idx in index_map.items():
        rows = idx[0]
        start, stop = rows.start or 0, global_batch_size if rows.stop is None else rows.stop
        per_process.setdefault(device.process_index, set()).add((start, stop))
    spans = {}
    for p, ranges in per_process.items():
        covered = sorted(ranges)
        if any(a[1] != b[0] for a, b in zip(covered, covered[1:])):
            raise ShardingError(f"process {p} would need non-contiguous rows {covered} of the batch; use a mesh "
                                f"whose data×fsdp axes give each process a contiguous block of devices.")
        spans[p] = (covered[0][0], covered[-1][1])
    blocks = sorted(set(spans.values()))
    even = len({hi - lo for lo, hi in blocks}) == 1
    tiled = blocks[0][0] == 0 and blocks[-1][1] == global_batch_size and all(
        a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    if not (even and tiled):
        raise ShardingError(f"processes would load uneven or overlapping batch slices {blocks}; use a mesh whose "
                            f"data×fsdp axes are split evenly across processes.")
    return blocks.index(spans[jax.process_index()]), len(blocks)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """This process's rows (from `process_rows`) → global jax.Arrays split per `batch_sharding`."""
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
    return out


def describe(tree: Any, shardings: Any, logical: Any | None = None) -> list[str]:
    """One line per leaf: path, shape, dtype, logical axes → mesh PartitionSpec (for `--dry-run`)."""
    lines = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    flat_lg = (jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, tuple)) if logical is not None
               else [None] * len(flat))
    for (path, leaf), sh, lg in zip(flat, flat_sh, flat_lg):
        lg_s = f" {lg}" if lg else ""
        lines.append(f"{_path_str(path):<48} {str(tuple(leaf.shape)):<22} {jnp.dtype(leaf.dtype).name:<9}"
                     f"{lg_s} -> {sh.spec}")
    return lines
