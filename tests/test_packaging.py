"""Installed names: the folders train/, data_pipeline/, launch/ and bench/ install as llama_jax_train,
llama_jax_data, llama_jax_launch and llama_jax_bench, so a user's own `train.py` (or bench.py, launch.py,
data_pipeline.py) in the working directory cannot shadow the trainer. Judge: the interpreter's own import
system, run from such a directory."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"train": "llama_jax_train", "data_pipeline": "llama_jax_data", "launch": "llama_jax_launch",
           "bench": "llama_jax_bench"}


def test_pyproject_lists_every_package_under_its_installed_name():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {new: old for old, new in FOLDERS.items()}
    found = set()
    for top in ["llama_jax", *FOLDERS]:
        for init in (REPO / top).rglob("__init__.py"):
            parts = list(init.parent.relative_to(REPO).parts)
            if "__pycache__" not in parts:
                found.add(".".join([FOLDERS.get(parts[0], parts[0]), *parts[1:]]))
    assert sorted(tool["packages"]) == sorted(found)


def test_the_installed_names_are_the_repository_folders():
    import llama_jax_bench
    import llama_jax_data
    import llama_jax_launch
    import llama_jax_train

    for mod, folder in ((llama_jax_train, "train"), (llama_jax_data, "data_pipeline"),
                        (llama_jax_launch, "launch"), (llama_jax_bench, "bench")):
        assert Path(mod.__file__).resolve().parent == REPO / folder


def test_cli_runs_from_a_directory_of_user_scripts_with_the_same_names(tmp_path):
    """`python -m llama_jax.cli` puts the working directory first on sys.path; the user's scripts there must
    not be imported (they would print and exit 3), and no module named train/bench/launch/data_pipeline
    is imported by the commands."""
    for name in ("train", "bench", "launch", "data_pipeline"):
        (tmp_path / f"{name}.py").write_text(f"print('USER SCRIPT {name}.py')\nraise SystemExit(3)\n")
    check = ("import sys, runpy\n"
             "sys.argv = ['llama-jax', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('llama_jax.cli', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "shadowed = sorted({'train', 'bench', 'launch', 'data_pipeline'} & set(sys.modules))\n"
             "print('SHADOWED', shadowed)\nsys.exit(code)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for command in ("train", "bench", "launch", "prepare", "eval", "quickstart", "preflight"):
        p = subprocess.run([sys.executable, "-c", check, command, "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and f"usage: llama-jax {command}" in p.stdout, (command, p.stdout, p.stderr)
        assert "USER SCRIPT" not in p.stdout and "SHADOWED []" in p.stdout, (command, p.stdout)
    # The console script too.
    exe = Path(sys.executable).parent / "llama-jax"
    p = subprocess.run([str(exe), "train", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "usage: llama-jax train" in p.stdout and "USER SCRIPT" not in p.stdout
