"""emjax: optimiser choice and emergent misalignment in LoRA fine-tuning, in JAX/Flax NNX."""

__version__ = "0.1.0"
