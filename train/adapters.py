"""The adapters of a LoRA training run, out: as a peft adapter, or merged into the base (`llama-jax convert
RUN_OR_CHECKPOINT OUT --to peft | --to hf|meta|orbax|gguf --merge-lora`).

A LoRA run's checkpoints hold the factors only; its `meta` item holds the run config, whose `lora` section
gives rank, alpha and targets and whose `train.init_from` names the base. A run without `init_from` started
from the seed's random base, which is rebuilt the same way (and put in NF4 again for QLoRA, so that the
merged model equals the adapted one the run trained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.convert.common import ConvertError


def read_lora_run(path: str | Path) -> tuple[Any, LlamaConfig, dict, int]:
    """(run config, model config, factor tree as numpy, step) of a LoRA run / checkpoint directory."""
    import flax.linen as nn
    import orbax.checkpoint as ocp

    from llama_jax.lora import init_factors
    from llama_jax.model import param_shapes
    from llama_jax_train import checkpoint as ckpt_lib
    from llama_jax_train.config import from_dict

    try:
        ck, step, model = ckpt_lib.open_checkpoint(path)
        meta = ck.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except ckpt_lib.CheckpointError as e:
        raise ConvertError(str(e)) from None
    run = from_dict(meta["run_config"])
    if run.lora is None:
        raise ConvertError(f"{path}: this run trained every parameter (no lora section); convert it without "
                           f"--to peft / --merge-lora.")
    lo = run.lora
    boxed = jax.eval_shape(lambda: init_factors(jax.random.key(0), param_shapes(model), lo.targets, lo.rank,
                                                dtype=jnp.dtype(model.param_dtype)))
    abstract = nn.meta.unbox(boxed)
    host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    factors = ckpt_lib.load_params(ck, step, abstract, jax.tree.map(lambda _: host, abstract))
    return run, model, jax.tree.map(np.asarray, factors), step


def base_params(run: Any, model: LlamaConfig, base: str | None = None) -> Any:
    """The run's frozen base as it trained on it (same layout as `model`, NF4 for QLoRA)."""
    import flax.linen as nn

    from llama_jax import convert
    from llama_jax.model import Llama, stack_layers, unstack_layers
    from llama_jax_train.step import lora_base

    source = base or run.train.init_from
    if source is None:
        params = Llama(model).init(jax.random.key(run.train.seed), jnp.zeros((1, 1), jnp.int32))["params"]
        params = nn.meta.unbox(params)
    else:
        src_cfg, params = convert.load(source)
        if src_cfg.scan_layers != model.scan_layers:
            params = stack_layers(params, model.layer_period) if model.scan_layers else unstack_layers(params)
    return lora_base(model, run.lora, params)


def lora_run_dir(path: str | Path) -> Path | None:
    """The LoRA training run that `path` (a run directory, its checkpoints/ or checkpoints/STEP) belongs to,
    or None where `path` is anything else (converted weights, a full-training run)."""
    import yaml

    from llama_jax_train import checkpoint as ckpt_lib

    if not Path(path).is_dir():
        return None
    try:
        run_dir = ckpt_lib.run_dir_of(path)
    except ckpt_lib.CheckpointError:
        return None
    if run_dir is None:
        return None
    return run_dir if (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("lora") else None


def adapted_model(path: str | Path, base: str | None = None) -> tuple[LlamaConfig, Any]:
    """A LoRA run's checkpoint as the model it trained: (model config, the frozen base — NF4 for QLoRA — with
    the checkpoint's factors attached as `llama_jax.lora.LoraWeight`s, for `Llama.apply` and `generate`)."""
    from llama_jax.lora import attach

    run, model, factors, _ = read_lora_run(path)
    return model, attach(base_params(run, model, base), factors, run.lora.scale)


def export(path: str | Path, out: str | Path, to: str, *, merge: bool, base: str | None = None,
           dtype: Any = None, num_shards: int = 1, gguf_type: str = "f16", tokenizer: str | None = None) -> Path:
    """Write the run's adapter (`to="peft"`) or base + adapter merged (`merge=True`, to meta/hf/orbax/gguf).

    GGUF (`gguf_type`) embeds a tokenizer: `tokenizer`, else the one `convert.find_tokenizer` finds for the
    run (its data manifest) or beside the base; finding none is an error, as for any GGUF export."""
    from llama_jax import convert
    from llama_jax.convert.peft import save_adapter
    from llama_jax.lora import merge as merge_factors

    run, model, factors, _ = read_lora_run(path)
    lo = run.lora
    if to == "peft":
        return save_adapter(model, factors, out, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, rslora=lo.rslora,
                            base_model_name_or_path=base or run.train.init_from, dtype=dtype)
    if not merge:
        raise ConvertError(f"{path} is a LoRA run: its checkpoints hold adapters only; add --merge-lora to write "
                           f"base + adapter as one {to} checkpoint, or use --to peft for the adapter alone.")
    if to == "gguf":
        tokenizer = tokenizer or gguf_tokenizer(path, base or run.train.init_from)
    merged = merge_factors(base_params(run, model, base), factors, lo.scale)
    cfg = model.replace(param_dtype=jnp.dtype(jax.tree.leaves(merged)[0].dtype).name)
    if to == "gguf":
        return convert.save(cfg, merged, out, format="gguf", num_shards=num_shards, dtype=dtype, gguf_type=gguf_type,
                            tokenizer=tokenizer)
    return convert.save(cfg, merged, out, format=to, num_shards=num_shards, dtype=dtype)


def gguf_tokenizer(path: str | Path, base: str | None) -> Path:
    """The tokenizer.model for a merged GGUF: the run's (beside it or from its data manifest), else beside
    the base weights; a ConvertError that asks for --tokenizer when there is neither."""
    from llama_jax.convert import find_tokenizer

    for where in (path, base):
        if where is not None and Path(where).is_dir():
            found = find_tokenizer(where)
            if found is not None:
                return found
    raise ConvertError(f"{path}: no tokenizer.model beside the run, in its data manifest or beside its base "
                       f"weights; pass --tokenizer FILE (GGUF embeds the vocabulary).")
