"""Optional dependencies are imported lazily; a missing one gets an error that names the extra to install."""
import importlib.util


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
