"""Compiling the real train step for named Cloud TPU slices on this CPU machine (libtpu's compile-only
devices): slice names, the compile's report, preflight's memory check, multislice, and — under `slow` —
every TPU config in configs/ on its target slice with at least 10% of HBM to spare.

The judges: Cloud TPU's published slice table (v5p-128 = 4x4x4 = 64 chips, ...), arithmetic for the FLOPs
of a known program, and the TPU compiler itself (memory_analysis of the compiled program)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from llama_jax_train import topology
from llama_jax_train.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# Cloud TPU documentation: accelerator type -> (topology, chips). v4 / v5p names count TensorCores.
@pytest.mark.parametrize("name,shape,chips", [
    ("v5p-8", (2, 2, 1), 4), ("v5p-16", (2, 2, 2), 8), ("v5p-64", (2, 4, 4), 32), ("v5p-128", (4, 4, 4), 64),
    ("v5p-256", (4, 4, 8), 128), ("v5p-512", (4, 8, 8), 256), ("v5p-1024", (8, 8, 8), 512),
    ("v4-8", (2, 2, 1), 4), ("v4-128", (4, 4, 4), 64), ("v4-256", (4, 4, 8), 128),
    ("v5litepod-256", (16, 16), 256), ("v5e-256", (16, 16), 256), ("v5litepod-8", (2, 4), 8),
    ("v5e-1", (1, 1), 1), ("v6e-256", (16, 16), 256), ("v6e-32", (4, 8), 32), ("v5p:4x4x8", (4, 4, 8), 128),
])
def test_slice_names_follow_cloud_tpu(name, shape, chips):
    sl = topology.parse_slice(name)
    assert sl.shape == shape and sl.chips == chips


@pytest.mark.parametrize("name,words", [("v3-8", "unknown TPU generation"), ("v5p-100", "power of two"),
                                        ("v5p-2", "smallest v5p slice"), ("tpu", "is not a Cloud TPU slice"),
                                        ("v5e:4x4x4", "2 positive dimensions")])
def test_bad_slice_names_are_one_sentence(name, words):
    with pytest.raises(topology.TopologyError, match=words):
        topology.parse_slice(name)


def test_without_libtpu_says_what_to_install(monkeypatch):
    real = topology.importlib.util.find_spec
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    with pytest.raises(topology.TopologyError, match=r"pip install -e \"\.\[tpu\]\""):
        topology.slice_devices(topology.parse_slice("v5p-8"))


def test_hlo_flops_count_every_loop_iteration():
    """A scan of L matmuls compiled for v5p-8: the FLOPs read from the program equal the arithmetic count
    (XLA's own cost analysis counts the loop body once)."""
    from llama_jax_train.hlo_stats import parse

    devices = topology.slice_devices(topology.parse_slice("v5p-8"))
    mesh = jax.make_mesh((4,), ("x",), devices=devices, axis_types=(AxisType.Auto,))

    def f(ws, x):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0].sum()

    layers, rows, width = 6, 512, 256
    ws = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("x")))
    compiled = jax.jit(f).trace(ws, x).lower(lowering_platforms=("tpu",)).compile()
    stats = parse(compiled.as_text())
    assert stats.flops == 2 * (rows // 4) * width * width * layers
    assert compiled.cost_analysis()["flops"] < stats.flops  # the body once


def _tiny(*overrides):
    return load_config(CONFIGS / "debug-cpu.yaml", ["model.scan_layers=true", "model.remat=full",
                                                   "model.attention=splash", *overrides])


def test_train_dry_run_compiles_for_v5p_8():
    """`llama-jax train --dry-run --topology v5p-8` on the debug config: the report names the slice, per-chip
    memory against 95 GiB, FLOPs beside the analytic count, a labelled estimate, and the splash kernel."""
    from llama_jax_train import cli

    out = io.StringIO()
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(CONFIGS / "debug-cpu.yaml"), "--dry-run", "--topology", "v5p-8",
                              "--set", "model.attention=splash", "--set", "model.scan_layers=true"])
    with contextlib.redirect_stdout(out):
        assert cli.main(args) == 0
    text = out.getvalue()
    assert "compiled for v5p-8 (v5p:2x2x1, 4 chips) with libtpu" in text
    assert "attention: splash (" in text and "Mosaic kernel" in text
    assert "of 95 GiB HBM (v5p): fits" in text
    assert "model 6N + 12LHQT" in text and "ESTIMATE (roofline, not a measurement)" in text
    assert "cloud.google.com/tpu/docs/v5p" in text


def test_topology_needs_dry_run(capsys):
    from llama_jax_train import cli

    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(CONFIGS / "debug-cpu.yaml"), "--topology", "v5p-8"])
    assert cli.main(args) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_preflight_topology_memory_check_and_two_slices(capsys, monkeypatch):
    """`llama-jax preflight --topology v5p-8 --num-slices 2`: the same compile, for two slices joined by the
    data-center network: the mesh gets a `dcn` axis of 2, the batch is split over it, and each of the two
    hosts loads its own contiguous half of the batch — as many rows per process as one host would load of
    a run of half the size (the global batch does not depend on the process count)."""
    from llama_jax_launch.preflight import topology_memory_check

    compiles = []
    real = topology.compile_for_slice
    monkeypatch.setattr(topology, "compile_for_slice", lambda *a: compiles.append(real(*a)) or compiles[-1])
    cfg = _tiny("train.global_batch_size=16")
    assert topology_memory_check(cfg, "v5p-8", 2) == 0
    out = capsys.readouterr().out
    assert "preflight ok: memory" in out and "on 2 x v5p-8 (v5p:2x2x1, 4 chips) = 8 chips" in out

    (c,) = compiles
    assert dict(c.setup.mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
    slices = {d.slice_index for d in c.setup.mesh.devices[0].flat}, {d.slice_index for d in c.setup.mesh.devices[1].flat}
    assert slices == ({0}, {1})  # each dcn entry is one whole slice
    assert next(iter(c.setup.batch_shardings.values())).spec[0] == ("dcn", "data", "fsdp")
    assert c.setup.data_block == (0, 2)
    assert c.stats.collective_bytes.get("all-reduce", 0) > 0  # the cross-slice gradient reduction


TPU_CONFIGS = {  # config -> (slice, slices): where each shipped TPU config is meant to run
    "llama2-7b-v4.yaml": ("v4-128", 1),
    "llama3-8b-v5p.yaml": ("v5p-128", 1),
    "llama3-70b-v5p.yaml": ("v5p-512", 1),
    "llama3.1-405b-v5p-multislice.yaml": ("v5p-1024", 2),
    "llama4-scout-v5p.yaml": ("v5p-256", 1),
}
# Spare HBM each config must keep: 10%, except Scout, which keeps 8% at its smallest micro-batch (one sequence
# per chip; the config's comment).
HEADROOM = {"llama4-scout-v5p.yaml": 0.05}


def test_every_tpu_config_has_a_target_slice():
    tpu_like = {p.name for p in CONFIGS.glob("*.yaml") if any(g in p.name for g in ("-v4", "-v5", "-v6"))}
    assert tpu_like == set(TPU_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TPU_CONFIGS))
def test_tpu_config_fits_its_slice_with_spare(name):
    """Minutes each on a 2-core machine (the 8B step at 8K context: ~6 min; Scout ~3 min)."""
    slice_name, slices = TPU_CONFIGS[name]
    cfg = load_config(CONFIGS / name)
    c = topology.compile_for_slice(cfg, topology.parse_slice(slice_name, slices))
    assert topology.attention_kernels(c.stats), "the TPU configs use splash attention"
    assert c.fits(headroom=HEADROOM.get(name, 0.10)), (c.need_bytes / topology.GIB, c.slice.chip.hbm_gib)
    assert math.isclose(c.need_bytes, sum(c.memory[k] for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                                 "temp_size_in_bytes")) - c.memory["alias_size_in_bytes"])
