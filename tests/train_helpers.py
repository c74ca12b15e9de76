"""Shared set-up for the trainer's tests: fast compilation for tiny models on a 2-core CPU.

Compilation dominates these tests. XLA's optimisation passes are skipped (3x faster; the same program and
sharding), and executables are shared through a persistent cache, in the test process and in the
subprocesses it starts (a resumed run then loads the executable the first run compiled).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax

FAST_COMPILE = {
    "jax_disable_most_optimizations": True,
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


def _read(name: str):
    try:
        return jax.config.read(name)
    except AttributeError:  # flags with a context manager are read as attributes
        return getattr(jax.config, name)


@contextlib.contextmanager
def fast_compile(cache_dir: Path):
    from jax.experimental.compilation_cache import compilation_cache

    settings = {**FAST_COMPILE, "jax_compilation_cache_dir": str(cache_dir)}
    old = {k: _read(k) for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    """Environment variables giving a child process the same fast-compile settings."""
    env = {k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in FAST_COMPILE.items()}
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    return env
