"""Optional dependencies are imported lazily; a missing one gets an error that names the extra to install."""
import importlib.util
import logging


# bitsandbytes (imported by transformers' Trainer and by peft, whether or not 8-bit state is used) tries at import, on
# CPUs with AVX512-BF16, to load its 4-bit CPU matmul from the Hub through the `kernels` package. Its failure (no
# `kernels`, or an unverifiable publisher) and, in offline mode, `kernels`' "skipping publisher trust check" for that
# repository are logged as warnings. They concern only the 4-bit CPU matmul, which hf_lowrank never calls, so users
# should not see them. Each entry: (logger, start of the message dropped there).
_BNB_KERNELS_REPO = "kernels-community/quantization-bitsandbytes"
_BNB_KERNELS_MESSAGES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{_BNB_KERNELS_REPO}'"),
)


class _DropBitsandbytesKernelsMessage(logging.Filter):
    def __init__(self, message_start: str):
        super().__init__()
        self.message_start = message_start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.message_start)


def silence_bitsandbytes_kernels_message() -> None:
    """Drop bitsandbytes' import-time "kernels" warnings (only those messages); must run before bitsandbytes is
    imported, so hf_lowrank and the recipes call it before importing transformers."""
    for logger_name, message_start in _BNB_KERNELS_MESSAGES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropBitsandbytesKernelsMessage) for f in logger.filters):
            logger.addFilter(_DropBitsandbytesKernelsMessage(message_start))


silence_bitsandbytes_kernels_message()


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_bitsandbytes_available() -> bool:
    return _available("bitsandbytes")


def require(module: str, extra: str, feature: str) -> None:
    """Raise ImportError naming the pip extra when `module` is missing."""
    if not _available(module):
        raise ImportError(
            f"{feature} needs the '{module}' package, which is not installed. "
            f'Install it with: pip install "hf_lowrank[{extra}]"'
        )
