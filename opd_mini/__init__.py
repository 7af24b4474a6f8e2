"""opd_mini: a small, exact reference implementation of on-policy distillation (README.md maps the package)."""

import logging
import os
import warnings

if not os.environ.get("OPD_MINI_VERBOSE"):
    # Notices a user cannot act on, filtered so that every command's first line is its own (OPD_MINI_VERBOSE=1
    # shows them): bitsandbytes' CPU backend warns at import, on CPUs with AVX-512 bf16, that an optional kernel
    # package is missing; its 8-bit matmul warns on every call that it casts fp32 inputs to fp16; transformers
    # warns that peft calls a renamed gradient-checkpointing property.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")

__version__ = "0.3.0"
