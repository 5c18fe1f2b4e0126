"""Helpers shared by the benchmark scripts: model builders, interleaved timing, the text corpus, output files.

Every benchmark prints a markdown table and writes ``<out_dir>/<name>.md`` and ``<out_dir>/<name>.png``.
Timings are only ever reported as ratios measured side by side in one process (see :func:`interleaved_times`).
"""
import gzip
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
CORPUS_DIR = REPO_ROOT / "data" / "text" / "tinyshakespeare"
MNIST_DIR = REPO_ROOT / "data" / "mnist"

# LLaMA configurations of the GaLore paper (configs/llama_*.json of jiaweizzhao/GaLore) and the ranks of its
# Table 2. Note: the 1B config has 32 heads and 24 layers (head count does not change any parameter shape).
PAPER_LLAMA = {
    "60M": dict(hidden=512, intermediate=1376, heads=8, layers=8, rank=128),
    "130M": dict(hidden=768, intermediate=2048, heads=12, layers=12, rank=256),
    "350M": dict(hidden=1024, intermediate=2736, heads=16, layers=24, rank=256),
    "1B": dict(hidden=2048, intermediate=5461, heads=32, layers=24, rank=512),
    "7B": dict(hidden=4096, intermediate=11008, heads=32, layers=32, rank=1024),
}
PAPER_VOCAB = 32000
# GaLore projects the attention and MLP linears only; embeddings, norms and lm_head stay full-rank.
PAPER_TARGET_MODULES = ["attn", "mlp"]


def setup_environment(threads: int) -> None:
    """Offline hub, a fixed number of torch threads, and a non-interactive matplotlib backend."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    torch.set_num_threads(threads)


def build_llama(hidden: int, intermediate: int, heads: int, layers: int, vocab: int, *, seed: int = 0,
                device: str | torch.device = "cpu", max_positions: int = 2048):
    """A randomly initialised ``LlamaForCausalLM`` (untied embeddings, as in the GaLore paper).

    ``device="meta"`` builds it without allocating any parameter memory (for state-size accounting).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=heads,
        num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


def projected_weights(model, target_modules=PAPER_TARGET_MODULES) -> list[torch.nn.Parameter]:
    """The 2-D weights that GaLore projects (same selection rule as ``hf_lowrank``'s optimizers)."""
    from hf_lowrank.utils.targets import find_target_linears

    return [module.weight for _, module in find_target_linears(model, target_modules)]


def galore_torch_param_groups(model, rank: int, update_proj_gap: int, scale: float,
                              target_modules=PAPER_TARGET_MODULES, proj_type: str = "std") -> list[dict]:
    """Parameter groups for galore-torch's ``GaLoreAdamW`` matching ``hf_lowrank``'s split (projected vs plain)."""
    projected = {id(p) for p in projected_weights(model, target_modules)}
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in projected]
    galore = [p for p in model.parameters() if id(p) in projected]
    return [{"params": regular},
            {"params": galore, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
             "proj_type": proj_type}]


def parse_mode(spec: str) -> tuple[str, dict]:
    """``"galore:quant_bits=4,seed=1"`` -> ``("galore", {"quant_bits": 4, "seed": 1})`` (ints, floats or strings)."""
    mode, _, options = spec.partition(":")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Mode option {item!r} in {spec!r} must look like key=value.")
        for cast in (int, float, str):
            try:
                parsed[key] = cast(value)
                break
            except ValueError:
                continue
    return mode, parsed


def create_mode_optimizer(model, spec: str, weight_group_size: int = 256, **kwargs):
    """``create_optimizer(model, mode, **options, **kwargs)`` for a mode spec ``"mode[:key=value,...]"``; modes that
    train quantized weights (``q_galore``) first prepare ``model`` in place (attention + MLP linears, groups of
    ``weight_group_size`` inputs)."""
    from hf_lowrank.optim import create_optimizer, get_mode

    mode, options = parse_mode(spec)
    if get_mode(mode).quantized_weights:
        from hf_lowrank.qgalore import prepare_model_for_qgalore

        prepare_model_for_qgalore(model, target_modules=PAPER_TARGET_MODULES, group_size=weight_group_size)
    return create_optimizer(model, mode, target_modules=PAPER_TARGET_MODULES, **options, **kwargs)


def interleaved_times(fns: dict[str, Callable[[], dict | None]], repeats: int, warmup: int = 1,
                      progress: str | None = None) -> dict[str, list[dict[str, float]]]:
    """Run every function once per round, round-robin, ``warmup + repeats`` rounds; return the timed rounds.

    Each timed round of a function gives a record ``{"total": seconds, **parts}``, where ``parts`` is what the
    function returned (e.g. its own split into forward/backward and optimizer step). Interleaving spreads
    machine noise (other processes on the shared cores) over all candidates alike, so ratios of medians are
    meaningful even when absolute times are not. The rotation's starting point shifts every round so that no
    candidate always runs first. ``progress``: a label to print after each round.
    """
    names = list(fns)
    records: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            parts = fns[name]() or {}
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                records[name].append({"total": elapsed, **parts})
        if progress:
            print(f"{progress}: round {round_index + 1}/{warmup + repeats}", flush=True)
    return records


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def load_corpus(split: str) -> torch.Tensor:
    """The shipped tiny-Shakespeare split (``"train"`` or ``"val"``) as a 1-D tensor of byte ids (vocab 256)."""
    if split not in ("train", "val"):
        raise ValueError(f"`split` must be 'train' or 'val', got {split!r}.")
    data = (CORPUS_DIR / f"{split}.txt").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len`` tokens (inputs double as labels for causal LM)."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


# A fixed mmap threshold makes glibc return every freed tensor buffer to the OS at once (its default raises the
# threshold after frees and keeps them), so peak RSS follows live memory. Set it in the environment of the
# processes whose memory is measured.
RSS_TRACKING_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def rss_kb(key: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak since the last :func:`reset_peak_rss` (``VmHWM``), in KB
    (Linux)."""
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def format_bytes(num_bytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats are printed as given by the caller (pre-format them)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, out_dir: str | Path, markdown: str, figure) -> tuple[Path, Path]:
    """Print ``markdown`` and save it as ``<out_dir>/<name>.md`` and ``figure`` as ``<out_dir>/<name>.png``."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out_dir / f"{name}.md", out_dir / f"{name}.png"
    md_path.write_text(markdown.rstrip() + "\n")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    print(markdown)
    print(f"\nwrote {md_path.relative_to(REPO_ROOT) if md_path.is_relative_to(REPO_ROOT) else md_path} and "
          f"{png_path.name}")
    return md_path, png_path


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run, recorded in the results file."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"benchmarks/{name}.py", *args])


def load_mnist_test_set() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images, the only MNIST split shipped (data/mnist/README.md), read from their IDX gzip
    files: (N, 784) uint8 pixels and int64 labels. Callers normalise and split."""
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels
