"""Optional dependencies are imported lazily; a missing one gets an error that names the extra to install."""
import importlib.util
import logging


# bitsandbytes (imported by transformers' Trainer and by peft, whether or not 8-bit state is used) logs a warning at
# import on CPUs with AVX512-BF16 when the optional `kernels` package is missing. It concerns only its 4-bit CPU
# matmul, which hf_lowrank never calls, so users should not see it.
_BNB_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropBitsandbytesKernelsMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_KERNELS_MESSAGE)


def silence_bitsandbytes_kernels_message() -> None:
    """Drop bitsandbytes' import-time "kernels" warning (only that message); must run before bitsandbytes is
    imported, so hf_lowrank and the recipes call it before importing transformers."""
    bnb_logger = logging.getLogger(_BNB_KERNELS_LOGGER)
    if not any(isinstance(f, _DropBitsandbytesKernelsMessage) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropBitsandbytesKernelsMessage())


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
