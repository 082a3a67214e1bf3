"""emjax: optimiser choice and emergent misalignment in LoRA fine-tuning, in JAX/Flax NNX."""

from emjax import _malloc  # noqa: F401  (first: before JAX starts its threads)

__version__ = "0.1.0"
