"""lrc_kernels: the fused COS-NCE contrastive loss of LRC-BERT, and cosine InfoNCE.

    import lrc_kernels as lk
    loss = lk.cos_nce_loss(student, teacher)                      # in-batch negatives
    loss = lk.cos_nce_loss(student, teacher, negatives)           # explicit [B, K, ...]
    loss = lk.info_nce_loss(student, teacher, bank, neg_index)    # rows of a bank

Importing this package needs neither Triton nor a compiler: backends load on first use.
"""

from .backends import available_backends, backend_names, register_backend
from .cpu_cache import cpu_cache_bytes, empty_cpu_cache, set_cpu_cache_limit
from .functional import cos_nce_loss, info_nce_loss
from .modules import CosNCELoss, InfoNCELoss

__version__ = "0.1.0"

__all__ = [
    "cos_nce_loss",
    "info_nce_loss",
    "CosNCELoss",
    "InfoNCELoss",
    "available_backends",
    "backend_names",
    "register_backend",
    "cpu_cache_bytes",
    "empty_cpu_cache",
    "set_cpu_cache_limit",
    "__version__",
]
