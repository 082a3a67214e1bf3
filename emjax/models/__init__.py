"""Model families (one file each) and checkpoint loading."""

from emjax.models.loading import CheckpointError, config_from_hf, from_pretrained
from emjax.models.qwen3 import KVCache, Qwen3Config, Qwen3ForCausalLM

__all__ = ["CheckpointError", "from_pretrained", "KVCache", "Qwen3Config", "Qwen3ForCausalLM", "config_from_hf"]
