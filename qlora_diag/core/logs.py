"""Silence the library messages every stage would print although they never mean a problem.

Each filter names one message exactly, so everything else those libraries log or warn stays
visible: a user who learns to skip a line that appears in every run also skips the real warning
printed next to it (issue 13).
"""
from __future__ import annotations

import logging
import warnings

# bitsandbytes 0.50 on CPUs with AVX512-BF16 tries to download an optional inference kernel from
# the Hugging Face hub at import; offline (a cluster node, CI) it logs this and falls back to its
# own kernel. The project never uses that kernel: models.loading.keep_4bit_differentiable turns
# the inference path off, since it has no backward.
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# transformers 5.x deprecates a property that its own Trainer / PEFT still read during training.
GRADIENT_CHECKPOINTING_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_library_noise() -> None:
    """Install the filters (idempotent). Call before bitsandbytes is imported: its logger object
    is created here, and the library's ``getLogger`` returns this same object."""
    bnb = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in bnb.filters):
        bnb.addFilter(_DropMessage(BNB_KERNEL_MESSAGE))
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATION,
                            category=FutureWarning)
