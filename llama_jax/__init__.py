"""llama-jax: the LLaMA family in JAX/Flax. The model library imports nothing from the trainer.

`from llama_jax import Llama, LlamaConfig, PRESETS` works as usual; the model's names are imported on
first use, so that parts which need no JAX (the tokenizer, data preparation, its worker processes)
start without importing it.
"""

from llama_jax.config import PRESETS, ConfigError, LlamaConfig, RopeScaling, get_preset

__all__ = ["PRESETS", "ConfigError", "Llama", "LlamaConfig", "RopeScaling", "active_params", "count_params", "get_preset", "init_cache"]
__version__ = "0.1.0"

_FROM_MODEL = ("Llama", "active_params", "count_params", "init_cache")


def __getattr__(name: str):
    if name in _FROM_MODEL:
        from llama_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_FROM_MODEL))
