"""Compile the real train step for a named Cloud TPU slice, on any machine — no TPU needed.

`pip install libtpu` brings Google's TPU compiler. With it, `jax.experimental.topologies.get_topology_desc`
describes a slice (e.g. `v5p:4x4x4`, 64 chips) as compile-only devices, and the trainer's jitted step —
the same function, shardings and donation as the loop (`llama_jax_train.loop.setup`) — is lowered for platform
"tpu" and compiled for them. Nothing is allocated and no data is read. From the compiled program:

- per-chip memory (`memory_analysis()`: arguments, outputs, temporaries, generated code) against the
  chip's HBM;
- FLOPs, HBM bytes and collective bytes per step (`llama_jax_train.hlo_stats`, loop bodies × trip counts) beside the
  model's analytic 6N + 12·L·H·Q·T;
- a roofline ESTIMATE of step time and MFU from the chip constants below (each cited);
- which attention kernel the program runs (splash attention shows up as a Mosaic custom call).

Slice names follow Cloud TPU: `v4-N` and `v5p-N` count TensorCores (2 per chip: v5p-128 = 64 chips),
`v5litepod-N` / `v5e-N` and `v6e-N` count chips. `v5p:4x4x8` names a shape directly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from typing import Any

GIB = 1024**3


class TopologyError(ValueError):
    """A slice name that cannot be read, or no TPU compiler installed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_gib: float  # HBM per chip
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # inter-chip interconnect, per chip
    dcn_bytes_per_s: float | None  # data-center network (between slices), per chip
    dims: int  # 3: 3D torus (AxBxC), 2: 2D torus (AxB)
    name_counts_cores: bool  # v4-N / v5p-N: N TensorCores = N/2 chips; v5e-N / v6e-N: N chips
    source: str  # where the constants come from


# Published constants (Google Cloud TPU documentation, system architecture pages). Bytes per second; the docs
# give ICI/DCN in Gbps (bits), converted /8.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32, 1200e9, 1.1e15 / 4096, None, 3, True,
               "cloud.google.com/tpu/docs/v4: peak 275 TFLOP/s bf16; HBM2 32 GiB, 1200 GBps; all-reduce bandwidth "
               "1.1 PB/s per 4096-chip pod (= 269 GB/s per chip, used as ICI); no DCN figure published"),
    "v5p": Chip("v5p", 459e12, 95, 2765e9, 4800e9 / 8, 50e9 / 8, 3, True,
                "cloud.google.com/tpu/docs/v5p: peak 459 TFLOP/s bf16; HBM2e 95 GiB, 2765 GBps; ICI 4800 Gbps; "
                "DCN 50 Gbps per chip"),
    "v5e": Chip("v5e", 197e12, 16, 819e9, 1600e9 / 8, 2 * 100e9 / 8 / 8, 2, False,
                "cloud.google.com/tpu/docs/v5e and the v5e column of /tpu/docs/v6e: peak 197 TFLOP/s bf16; HBM 16 GB, "
                "819 GBps; ICI 1600 Gbps; 2 x 100 Gbps NICs per 8-chip host (25 Gbps per chip)"),
    "v6e": Chip("v6e", 918e12, 32, 1640e9, 3584e9 / 8, 4 * 200e9 / 8 / 8, 2, False,
                "cloud.google.com/tpu/docs/v6e: peak 918 TFLOP/s bf16; HBM 32 GB, 1640 GBps; ICI 3584 Gbps; "
                "4 x 200 Gbps NICs per 8-chip host (100 Gbps per chip)"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """`num_slices` identical slices of `shape` chips (multislice when > 1)."""

    name: str
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        one = f"{self.name} ({self.topology_name}, {self.chips_per_slice} chips)"
        return one if self.num_slices == 1 else f"{self.num_slices} x {one} = {self.chips} chips"


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's usual shape for a slice of `chips` (a power of two): 3D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4,
    4x4x8, ...; 2D 1x1, 2x2, 2x4, 4x4, 4x8, ..., 16x16."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(chips)
    if dims == 3 and chips == 4:
        return (2, 2, 1)
    shape = [1] * dims
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(shape))


def parse_slice(text: str, num_slices: int = 1) -> Slice:
    """`v5p-128`, `v4-64`, `v5litepod-256`, `v5e-16`, `v6e-256` (Cloud TPU accelerator types) or `v5p:4x4x8`."""
    valid = "a Cloud TPU slice such as v5p-128, v4-64, v5litepod-256 (v5e-256), v6e-256, or a shape such as v5p:4x4x8"
    if num_slices < 1:
        raise TopologyError(f"--num-slices must be at least 1, got {num_slices}.")
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", text.strip().lower())
    if not m:
        raise TopologyError(f"--topology {text!r} is not {valid}.")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise TopologyError(f"--topology {text!r}: unknown TPU generation {m.group(1)!r}; known: "
                            f"{', '.join(CHIPS)} (v5litepod = v5e).")
    chip = CHIPS[gen]
    if m.group(3):
        shape = tuple(int(d) for d in m.group(3).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise TopologyError(f"--topology {text!r}: a {gen} shape has {chip.dims} positive dimensions.")
    else:
        n = int(m.group(2))
        chips = n // 2 if chip.name_counts_cores else n
        unit = "TensorCores (2 per chip)" if chip.name_counts_cores else "chips"
        try:
            if chip.name_counts_cores and n % 2:
                raise ValueError(n)
            shape = default_shape(chips, chip.dims)
        except ValueError:
            raise TopologyError(f"--topology {text!r}: the number after {gen}- counts {unit}; give a power of two "
                                f"(or the shape itself, e.g. {gen}:{'x'.join(['4'] * chip.dims)}).") from None
        if chip.dims == 3 and chips < 4:
            raise TopologyError(f"--topology {text!r}: the smallest {gen} slice is {gen}-8 (4 chips).")
    return Slice(text.strip(), chip, shape, num_slices)


def _need_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError("compiling for a TPU slice needs Google's TPU compiler, which is not installed: "
                            "pip install -e \".[tpu]\" (or pip install libtpu, the version your jax pins).")


def slice_devices(sl: Slice) -> list:
    """libtpu's compile-only devices for the slice(s): one per chip, with `slice_index` for multislice."""
    _need_libtpu()
    # libtpu otherwise looks for a TPU VM's metadata server and host list at start-up (and warns on a machine
    # that has none); these say "no TPU here, a single worker". Compiling touches no chip, so several processes
    # may do it at once (libtpu's lockfile guards real chips). Set only on this path, only where unset.
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", f"{sl.chip.generation}-8"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {"num_slices": sl.num_slices} if sl.num_slices > 1 else {}
    if sl.chip.name_counts_cores:
        kwargs["chip_config_name"] = "megacore"  # one device per chip (both TensorCores), as jax uses v4/v5p
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=sl.topology_name, **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu rejects the shape: one sentence
        raise TopologyError(f"libtpu cannot describe {sl.describe()}: {str(e).splitlines()[0][:200]}") from None
    return list(topo.devices)


@dataclasses.dataclass
class SliceCompile:
    """The train step compiled for a slice, and what the compile says about it."""

    cfg: Any  # the RunConfig compiled (attention resolved for TPU; mesh.dcn = the slice count)
    slice: Slice
    setup: Any  # llama_jax_train.loop.Setup over the compile-only devices
    compiled: Any
    seconds: float
    memory: dict[str, int] | None  # llama_jax_train.loop.MEMORY_FIELDS -> bytes per chip
    need_bytes: int | None  # arguments + outputs - aliases + temporaries
    stats: Any  # llama_jax_train.hlo_stats.HloStats
    attention: str  # what the program runs, e.g. "splash (Mosaic kernel in the program)"

    @property
    def hbm_bytes(self) -> int:
        return int(self.slice.chip.hbm_gib * GIB)

    def fits(self, headroom: float = 0.0) -> bool:
        return self.need_bytes is not None and self.need_bytes <= self.hbm_bytes * (1 - headroom)


def resolve_for_tpu(cfg: Any, sl: Slice) -> Any:
    """The run config as it will run on the slice: `attention: auto` becomes the TPU kernel explicitly (this
    host's own backend is not the target), and `mesh.dcn` spans the slices."""
    from llama_jax.attention import IMPLEMENTATIONS

    model = cfg.model
    if model.attention == "auto":
        model = model.replace(attention="splash" if "splash" in IMPLEMENTATIONS else "xla")
    mesh = cfg.mesh
    if mesh.dcn != 1 and mesh.dcn != sl.num_slices:
        raise TopologyError(f"the config's mesh.dcn is {mesh.dcn} slices but the compile is for {sl.describe()}; "
                            f"pass --num-slices {mesh.dcn}.")
    mesh = dataclasses.replace(mesh, dcn=sl.num_slices)
    return dataclasses.replace(cfg, model=model, mesh=mesh)


def compile_for_slice(cfg: Any, sl: Slice) -> SliceCompile:
    """`cfg`'s train step compiled by libtpu for `sl` (see the module docstring)."""
    from llama_jax_train import hlo_stats
    from llama_jax_train.loop import compile_step, setup, step_memory

    devices = slice_devices(sl)
    cfg = resolve_for_tpu(cfg, sl)
    s = setup(cfg, devices)
    compiled, seconds = compile_step(s, lowering_platforms=("tpu",))
    mem = step_memory(compiled)
    text = compiled.as_text()
    stats = hlo_stats.parse(text)
    kernels = attention_kernels(stats)
    if kernels:
        attention = f"{cfg.model.attention} ({kernels} Mosaic kernel call(s) in the program: no T x T scores in HBM)"
    else:
        attention = f"{cfg.model.attention} (plain XLA ops: the T x T scores are materialised)"
    return SliceCompile(cfg, sl, s, compiled, seconds, None if mem is None else mem[0],
                        None if mem is None else mem[1], stats, attention)


GROUPED_MATMUL_KERNELS = ("gmm", "tgmm")  # megablox (MoE experts): gmm forward and input gradient, tgmm weight gradient


def attention_kernels(stats: Any) -> int:
    """Mosaic kernel calls in the program other than the MoE grouped matmuls (splash attention's)."""
    return sum(n for k, n in stats.kernels.items() if k not in GROUPED_MATMUL_KERNELS)


def grouped_matmul_kernels(stats: Any) -> int:
    return sum(stats.kernels.get(k, 0) for k in GROUPED_MATMUL_KERNELS)


def _dcn_bytes_estimate(c: SliceCompile) -> float:
    """Bytes each chip sends across slices per step: its shard of the float32 gradients, all-reduced over the
    `dcn` axis (a ring moves each byte about twice)."""
    if c.slice.num_slices == 1:
        return 0.0
    import jax

    per_chip = 0.0
    for leaf, shd in zip(jax.tree.leaves(c.setup.abstract_state.params), jax.tree.leaves(c.setup.state_shardings.params)):
        per_chip += 4 * math.prod(shd.shard_shape(leaf.shape))
    return 2.0 * per_chip * (c.slice.num_slices - 1) / c.slice.num_slices


def report_lines(c: SliceCompile) -> list[str]:
    """The human report of a slice compile: memory, FLOPs, roofline estimate, attention."""
    from llama_jax_train.metrics import flops_per_token

    cfg, sl, chip = c.cfg, c.slice, c.slice.chip
    lines = [f"compiled for {sl.describe()} with libtpu in {c.seconds:.1f}s; mesh {dict(c.setup.mesh.shape)}; "
             f"attention: {c.attention}"]
    if c.memory is not None:
        parts = ", ".join(f"{k.replace('_size_in_bytes', '')} {v / GIB:.2f}" for k, v in c.memory.items())
        lines.append(f"per-chip memory (GiB): {parts}")
        verdict = "fits" if c.fits() else "DOES NOT FIT"
        spare = 1 - c.need_bytes / c.hbm_bytes
        lines.append(f"per-chip total {c.need_bytes / GIB:.2f} GiB of {chip.hbm_gib:g} GiB HBM ({chip.generation}): "
                     f"{verdict}, {spare:.0%} spare" + ("" if spare >= 0.10 else
                                                        " (under 10%: raise micro_batches, remat or sharding)"))
    tokens = cfg.tokens_per_step
    analytic = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / sl.chips
    attention_flops = 12.0 * cfg.model.n_layers * cfg.model.n_heads * cfg.model.head_dim * cfg.data.seq_len * \
        tokens / sl.chips
    kernel = attention_kernels(c.stats) > 0
    # The routed experts' matmuls, when megablox kernels run them: 6 x their active parameters per token (a lower
    # bound: a rematerialised forward runs them again).
    m = cfg.model
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    expert_flops = (6.0 * moe_layers * m.experts_per_token * 3 * m.dim * m.expert_hidden * tokens / sl.chips
                    if grouped_matmul_kernels(c.stats) else 0.0)
    invisible = [name for name, there in (("the attention kernel's", kernel), ("the experts' grouped matmuls'",
                                                                               bool(expert_flops))) if there]
    lines.append(f"FLOPs per chip per step: compiled program {c.stats.flops:.3e} (matmuls, loops x trip counts"
                 + (f"; {' and '.join(invisible)} FLOPs are not visible to the compiler" if invisible else "")
                 + f"); model 6N + 12LHQT {analytic:.3e}" + f" (ratio {c.stats.flops / analytic:.2f})")
    # Roofline ESTIMATE: each resource at its published peak, perfectly overlapped (the max) — a lower bound
    # on the step time, so an upper bound on MFU. Kernels' FLOPs are added from the model's count.
    compute_flops = c.stats.flops + (attention_flops if kernel else 0.0) + expert_flops
    t_compute = compute_flops / chip.peak_flops
    t_hbm = c.stats.hbm_bytes / chip.hbm_bytes_per_s
    dcn = _dcn_bytes_estimate(c)
    ici = max(c.stats.total_collective_bytes - dcn, 0.0)
    t_ici = ici / chip.ici_bytes_per_s
    t_dcn = dcn / chip.dcn_bytes_per_s if dcn and chip.dcn_bytes_per_s else 0.0
    step = max(t_compute, t_hbm, t_ici, t_dcn)
    mfu = analytic / (step * chip.peak_flops) if step else float("nan")
    secs = lambda x: f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.2f} ms"  # noqa: E731
    lines.append(f"ESTIMATE (roofline, not a measurement): compute {secs(t_compute)}, HBM {secs(t_hbm)} "
                 f"({c.stats.hbm_bytes / GIB:.1f} GiB), ICI {secs(t_ici)} ({ici / GIB:.2f} GiB collectives)"
                 + (f", DCN {secs(t_dcn)} ({dcn / GIB:.2f} GiB gradient all-reduce)" if sl.num_slices > 1 else "")
                 + f" -> step >= {secs(step)}, MFU <= {mfu:.0%}, {tokens / step:,.0f} tokens/s"
                 if step else "ESTIMATE: no work found in the compiled program")
    lines.append(f"  constants: {chip.source}")
    return lines


def dry_run(cfg: Any, topology: str, num_slices: int | None = None, out=None) -> int:
    """`llama-jax train --dry-run --topology NAME`: compile for the slice (`num_slices` of them; default the
    config's mesh.dcn) and print `report_lines`."""
    out = out or sys.stdout
    sl = parse_slice(topology, num_slices or cfg.mesh.dcn)
    t0 = time.perf_counter()
    c = compile_for_slice(cfg, sl)
    for line in report_lines(c):
        print(line, file=out)
    print(f"(whole dry run {time.perf_counter() - t0:.1f}s on this host; nothing was allocated)", file=out)
    return 0
