"""The distributed driver of :class:`~hf_lowrank.optim.ProjectedOptimizer`, on plain ``torch.distributed``.

Three layouts of a parameter are supported; the first two are detected per parameter, the third is declared:

* **replicated** (DDP, or any data-parallel wrapper that all-reduces gradients): every rank holds the whole
  matrix and the same averaged gradient. A projector refresh is computed once, on the parameter's *owner* rank,
  and its tensors are broadcast, so replicas hold bit-identical bases by construction (not by LAPACK's
  determinism), and the SVD work is divided by the world size.
* **row-sharded** (FSDP2's ``fully_shard``: a DTensor with ``Shard(0)`` on a 1-D mesh): each rank holds rows
  ``[start, start + rows)`` of the parameter and of its gradient. The optimizer works on the local shard; the
  refresh gathers the full gradient on the owner rank only, which fits the projector and broadcasts it.
* **flat partition** (DeepSpeed ZeRO-1/2, declared by ``hf_lowrank.optim.deepspeed.attach_zero``): a group's
  matrices flattened into one buffer, each rank holding one contiguous partition (:class:`FlatPartition`,
  :class:`Piece`); each matrix's low-rank gradient is summed from the ranks' pieces by one all-reduce.

Owners are assigned once per optimizer by longest-processing-time-first over the projected matrices (cost
``m * n * min(m, n)``, the SVD's), so each rank's refresh work is balanced. Refreshes run in rounds: in each
round every rank fits at most one matrix (its own, after gathering its gradient under FSDP2), in parallel, so at
most one gathered full gradient per rank exists at a time; then each owner broadcasts all its results at once
(one coalesced buffer per dtype).

Communication (bytes of the collectives this module issues; DDP's / FSDP2's own gradient reduction is extra):

* per step: one all-reduce of the non-finite flags under FSDP2 and ZeRO (a few bytes); for each left-projected
  row-sharded matrix (``Q`` is ``m x r``) an all-reduce of its ``r x n`` low-rank gradient, and under ZeRO one of
  every matrix's low-rank gradient. Nothing under DDP.
* per refresh of a data-dependent projector (SVD, randomized SVD, DCT): a broadcast of its state (an SVD basis
  ``dim x r``, DCT indices ``r`` int32), plus under FSDP2 / ZeRO a gather of the ``m x n`` gradient on the owner.
  Seeded random projectors communicate nothing (every rank draws the same basis).
"""
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_dtensor(tensor) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@dataclass(frozen=True)
class Layout:
    """Where a parameter's data lives: ``group`` (None: not distributed), this rank's ``rank`` in it, its
    ``world_size``, and for a row-sharded parameter the local rows ``[start, start + rows)`` of ``global_rows``."""

    group: object = None
    rank: int = 0
    world_size: int = 1
    sharded: bool = False
    start: int = 0
    rows: int = 0
    global_rows: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def layout_of(p: torch.Tensor, replicated: bool) -> Layout:
    """The layout of parameter ``p``; ``replicated=False`` treats plain tensors as per-rank (no sharing)."""
    if is_dtensor(p):
        from torch.distributed.tensor import Shard

        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
            raise ValueError(
                f"ProjectedOptimizer supports DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2's "
                f"fully_shard); got placements {tuple(placements)} on a {mesh.ndim}-D mesh. HSDP / tensor parallel "
                "layouts are not supported yet: use fully_shard on a 1-D mesh, or DDP."
            )
        group = mesh.get_group()
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        local_rows = p.to_local().shape[0] if p.dim() else 0
        chunk = -(-p.shape[0] // size) if p.dim() else 0  # torch.chunk semantics, as FSDP2 shards
        start = min(rank * chunk, p.shape[0]) if p.dim() else 0
        return Layout(group, rank, size, True, start, local_rows, p.shape[0] if p.dim() else 0)
    if replicated:
        rank, size = world()
        if size > 1:
            return Layout(dist.group.WORLD, rank, size)
    return Layout()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local data of a (possibly DTensor) tensor, sharing its storage."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_state(value: torch.Tensor, like: torch.Tensor, global_rows: int):
    """Wrap a row-sharded local state tensor as a DTensor laid out like parameter ``like`` (for checkpoints)."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size((global_rows,) + tuple(value.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride)


def all_reduce_(tensor: torch.Tensor, layout: Layout, op=None) -> None:
    """In-place all-reduce (sum by default) over the parameter's group; a no-op when not distributed."""
    if layout.distributed:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=layout.group)


def assign_owners(shapes: list[tuple[int, int]], world_size: int) -> list[int]:
    """Owner rank of each matrix: longest-processing-time-first on the SVD cost ``m * n * min(m, n)``."""
    order = sorted(range(len(shapes)), key=lambda i: (-shapes[i][0] * shapes[i][1] * min(shapes[i]), i))
    loads, owners = [0] * world_size, [0] * len(shapes)
    for i in order:
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = owner
        loads[owner] += shapes[i][0] * shapes[i][1] * min(shapes[i])
    return owners


@dataclass
class RefreshItem:
    """One projector refresh: ``fit(full_gradient)`` runs the refresh; ``grad`` is the local gradient (or piece);
    ``gather(stats)``, when given, returns the full gradient on the owner (None elsewhere)."""

    projector: object
    grad: torch.Tensor
    layout: Layout
    owner: int
    fit: object
    gather: object = None


class CommStats:
    """Bytes this module sent through collectives, split into per-step and per-refresh traffic."""

    def __init__(self):
        self.step_bytes = 0
        self.refresh_bytes = 0
        self.refreshes_fitted = 0
        self.refresh_seconds = 0.0  # wall time inside refresh(): fitting, gathers and broadcasts

    def count(self, kind: str, tensor: torch.Tensor, factor: int = 1) -> None:
        nbytes = tensor.numel() * tensor.element_size() * factor
        if kind == "step":
            self.step_bytes += nbytes
        else:
            self.refresh_bytes += nbytes


def refresh(items: list[RefreshItem], stats: CommStats) -> None:
    """Run the refreshes of ``items`` (same order on every rank): each on its owner, then broadcast. The time spent
    is added to ``stats.refresh_seconds`` (host wall time: on CUDA, synchronise around it for device time).

    A projector whose basis does not depend on the gradient (``data_dependent = False``) is fitted on every rank
    with no communication. Items not distributed are fitted locally.
    """
    started = time.perf_counter()
    _refresh(items, stats)
    stats.refresh_seconds += time.perf_counter() - started


def _refresh(items: list[RefreshItem], stats: CommStats) -> None:
    shared = []
    for item in items:
        if not item.layout.distributed or not item.projector.data_dependent:
            if item.projector.data_dependent:
                item.fit(item.grad)
                stats.refreshes_fitted += 1
            else:  # the basis depends only on the seed and the refresh count: a stand-in of the full shape
                item.fit(item.grad.new_zeros(()).expand(item.projector.shape))
        else:
            shared.append(item)
    by_owner: dict[int, list[RefreshItem]] = {}
    for item in shared:
        by_owner.setdefault(item.owner, []).append(item)
    rounds = max((len(v) for v in by_owner.values()), default=0)
    for index in range(rounds):  # a round: each owner's next matrix (its gather first: collectives, same order)
        batch = [v[index] for _, v in sorted(by_owner.items()) if index < len(v)]
        fulls = [_full_gradient_on_owner(item, stats) for item in batch]
        for item, full in zip(batch, fulls):
            if item.layout.rank == item.owner:
                item.fit(full)
                stats.refreshes_fitted += 1
            elif not item.projector.initialized:  # the state's structure (shapes, dtypes), once, without data
                item.fit(torch.empty(item.projector.shape, dtype=item.grad.dtype, device="meta"))
        del fulls
    _broadcast_projectors(shared, stats)


def _full_gradient_on_owner(item: RefreshItem, stats: CommStats):
    """The full ``m x n`` gradient on the owner (None elsewhere): the local one when replicated, else gathered."""
    layout, grad = item.layout, item.grad
    if item.gather is not None:
        return item.gather(stats)
    if not layout.sharded:
        return grad if layout.rank == item.owner else None
    chunk = -(-layout.global_rows // layout.world_size)
    gathered = gather_padded(grad, chunk, layout.group, layout.rank, layout.world_size, item.owner, stats)
    return None if gathered is None else torch.cat(gathered)[: layout.global_rows]


def gather_padded(values: torch.Tensor, length: int, group, rank: int, world_size: int, owner: int,
                  stats: CommStats):
    """Gather every rank's ``values`` on ``owner``, each zero-padded to ``length`` along dim 0 (``dist.gather``
    needs equal sizes): the list of padded tensors there, None elsewhere."""
    padded = values.new_zeros((length,) + tuple(values.shape[1:]))
    padded[: values.shape[0]] = values
    received = [torch.empty_like(padded) for _ in range(world_size)] if rank == owner else None
    dist.gather(padded, received, group=group, group_dst=owner)
    stats.count("refresh", padded, world_size - 1)
    return received


def _broadcast_projectors(items: list[RefreshItem], stats: CommStats) -> None:
    """Send every owner's fitted projector tensors to the other ranks: one coalesced broadcast per (process group,
    owner, dtype). The receivers' own state gives the structure (a projector's state keeps its shapes and dtypes
    across refreshes; before the first one they fitted a meta template)."""
    senders: dict[tuple, list[RefreshItem]] = {}
    for item in items:  # first-appearance order: the same on every rank
        senders.setdefault((id(item.layout.group), item.owner), []).append(item)
    for (_, owner), members in senders.items():
        layout = members[0].layout
        entries = [(item, key) for item in members for key in sorted(item.projector.state_dict())]
        states = {id(item): item.projector.state_dict() for item in members}
        by_dtype: dict[torch.dtype, list[tuple]] = {}
        for item, key in entries:
            by_dtype.setdefault(states[id(item)][key].dtype, []).append((item, key))
        for dtype, group in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
            device = group[0][0].grad.device
            if layout.rank == owner:
                flat = _flatten_dense_tensors([states[id(item)][key].to(device) for item, key in group])
            else:
                flat = torch.empty(sum(states[id(item)][key].numel() for item, key in group), dtype=dtype,
                                   device=device)
            dist.broadcast(flat, group=layout.group, group_src=owner)
            stats.count("refresh", flat)
            if layout.rank != owner:
                templates = [torch.empty(states[id(item)][key].shape, dtype=dtype, device="meta")
                             for item, key in group]
                for (item, key), value in zip(group, _unflatten_dense_tensors(flat, templates)):
                    states[id(item)][key] = value
        if layout.rank != owner:
            for item in members:
                item.projector.load_state_dict(states[id(item)])


@dataclass(frozen=True)
class Piece:
    """Matrix ``index`` (of shape ``shape``, flattened row-major at ``offset`` in the flat group buffer) and the
    elements ``[start, end)`` of it that this rank's partition holds (``start == end``: none), at ``local`` in it."""

    index: int
    shape: tuple
    offset: int
    start: int
    end: int
    local: int

    def block(self, flat: torch.Tensor):
        """``(first row, rows x n block)`` holding this rank's elements, zero elsewhere (partial first/last rows)."""
        n = self.shape[1]
        first, last = self.start // n, (self.end - 1) // n
        block = flat.new_zeros((last - first + 1, n))
        block.view(-1)[self.start - first * n: self.end - first * n] = flat[self.local: self.local + self.end - self.start]
        return first, block

    def add_(self, flat: torch.Tensor, first: int, block: torch.Tensor, alpha: float) -> None:
        """``flat[this rank's elements] += alpha * block[those elements]``."""
        n = self.shape[1]
        values = block.reshape(-1)[self.start - first * n: self.end - first * n]
        flat[self.local: self.local + self.end - self.start].add_(values.to(flat.dtype), alpha=alpha)


@dataclass
class FlatPartition:
    """A group flattened into one buffer and split into equal contiguous partitions, one per rank (DeepSpeed
    ZeRO-1/2): the optimizer holds this rank's partition as a single 1-D parameter. Matrices cut anywhere,
    even mid-row; every rank knows every rank's range, so pieces are gathered without exchanging sizes."""

    group: object
    rank: int
    world_size: int
    partition_size: int
    matrices: list  # (original index, shape, offset) in flat-buffer order
    owners: list

    def pieces(self, rank: int | None = None) -> list[Piece]:
        rank = self.rank if rank is None else rank
        begin, finish = rank * self.partition_size, (rank + 1) * self.partition_size
        out = []
        for index, shape, offset in self.matrices:
            numel = shape[0] * shape[1]
            lo, hi = max(begin, offset), min(finish, offset + numel)
            out.append(Piece(index, shape, offset, lo - offset if hi > lo else 0, hi - offset if hi > lo else 0,
                             lo - begin if hi > lo else 0))
        return out

    def layout(self) -> Layout:
        return Layout(self.group, self.rank, self.world_size, sharded=True)

    def gather(self, k: int, flat_grad: torch.Tensor, owner: int, stats: CommStats):
        """Matrix ``k``'s full gradient on ``owner`` (None elsewhere), gathered from every rank's piece."""
        pieces = [self.pieces(r)[k] for r in range(self.world_size)]
        longest = max(max(p.end - p.start for p in pieces), 1)
        mine = pieces[self.rank]
        received = gather_padded(flat_grad[mine.local: mine.local + mine.end - mine.start], longest, self.group,
                                 self.rank, self.world_size, owner, stats)
        if received is None:
            return None
        shape = pieces[0].shape
        full = flat_grad.new_zeros(shape[0] * shape[1])
        for piece, values in zip(pieces, received):
            full[piece.start: piece.end] = values[: piece.end - piece.start]
        return full.view(shape)
