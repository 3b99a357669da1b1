"""fgjax: fine-grained visual classification in JAX/Flax.

Sub-packages:
  fgjax.models   -- Flax Linen models (ViT/DeiT, ...), `fgjax.models.create(name, ...)`.
  fgjax.convert  -- pretrained-weight import (timm/DeiT .pth, .safetensors, Google ViT .npz).
  fgjax.data     -- datasets and the input pipeline.
"""

__version__ = "0.1.0"
