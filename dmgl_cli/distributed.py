"""Data-parallel training over N processes (``dmgl train --nproc N`` or an external ``torchrun``).

The rule that keeps a run independent of N: **every rank computes the single-process loss of the global batch**.

* The epoch's order and each global batch are those of one process (``EpochBatchSampler``, seeded by (seed,
  epoch)); rank r reads only its contiguous slice of each batch (:func:`~dmgl_cli.data.loader.slice_bounds`; ``ArraySplit.shard``), and
  frame sampling and augmentation are drawn for the whole batch, so a sample is transformed as one process would.
* After the forward of its slice, each rank all-gathers the model's output (logits, per-modality logits, embeddings,
  the methods' batch-shaped extras) *with autograd* (:func:`gather_output`). The losses — cross-entropy, the InfoNCE
  of the whole batch with every negative, the methods' batch statistics (OGM-GE's scores, AGM's Shapley terms, PMR's
  prototype distances, MLA's projection) — are then the one-process values on every rank.
* A backward through the gathered output gives rank r the gradient through its own slice, summed over the N
  identical losses (the all-gather's backward sums), i.e. N times its share; terms of the loss that read parameters
  directly give their gradient once per rank. The mean over ranks (:meth:`DistributedContext.average_gradients`, one
  flat all-reduce) is therefore the one-process gradient in both cases. The same mean is taken of every gradient
  that ``torch.autograd.grad`` makes outside ``.grad`` (the LB strategy's ``g_MM - g_CLS``, ``v`` and Hessian-vector
  products): :meth:`DistributedContext.average`.
* Evaluation shards whole batches (batch i on rank i mod N), so each batch is computed as one process computes it,
  and the per-batch records are gathered back in order: the metrics equal the single-process ones.
* The methods' own passes share their work too: PMR's prototype batches and G-Blend's copies are sliced like training
  batches (sums, counts and gradients reduced), validation passes (MSES, DomFN, MLA, G-Blend) share whole batches and
  sum their totals over the ranks (:meth:`DistributedContext.sum_values`).

Why not ``torch.nn.parallel.DistributedDataParallel``: its reducer all-reduces in the hooks of one backward that
follows its own forward. A dmgl step differentiates one forward several times (``autograd.grad`` for the LB
strategy, which bypasses the hooks anyway), runs forwards the hooks would miss (outer batches, AGM's subsets, MLA's
per-modality passes, methods that call submodules) and already all-gathers the output with autograd. The gradients
are reduced explicitly instead, once per step after the backward: the same mean DDP computes, without the overlap
of communication with the backward.

What is not per-sample, and so not equal to one process at N > 1: BatchNorm's batch statistics in training mode
(on CUDA the model's BatchNorm layers become ``SyncBatchNorm``, whose statistics are those of the global batch; on
the CPU each rank normalises its slice, and rank 0's running statistics are broadcast after every step, as DDP's
``broadcast_buffers`` does) and dropout masks (drawn per rank).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dmgl_cli.data.loader import slice_bounds
from dmgl_cli.errors import DmglError

LOG = logging.getLogger("dmgl")

# How long a collective waits for a peer before it fails (a rank that died is normally noticed at once: its socket
# closes). Long enough for rank 0's MLflow writes and checkpoint between two collectives.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class DistributedContext:
    """This process's place in the job: rank ``rank`` of ``world`` (1 = a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    released: bool = False  # rank 0 told the other ranks there is nothing more to train

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that talks to MLflow, writes checkpoints and prints."""
        return self.rank == 0

    # -------------------------------------------------------------------------------------------- collectives
    def average(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The mean over ranks of each tensor (one flat all-reduce); the input itself when not distributed."""
        return self._all_reduce(tensors, mean=True)

    def sum_tensors(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor summed over the ranks (one flat all-reduce)."""
        return self._all_reduce(tensors, mean=False)

    def _all_reduce(self, tensors: Sequence[Tensor], mean: bool) -> list[Tensor]:
        tensors = list(tensors)
        if not self.active or not tensors:
            return tensors
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        dist.all_reduce(flat)
        if mean:
            flat /= self.world
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
            start += t.numel()
        return out

    def average_gradients(self, parameters: Sequence[Tensor], stop_requested: bool) -> bool:
        """Replace each parameter's ``.grad`` by its mean over ranks, in one all-reduce that also carries the stop
        flag; returns whether any rank asked to stop (so that all ranks stop after the same step). A parameter
        without a gradient has none on every rank (the same graph on every rank) and stays without."""
        if not self.active:
            return stop_requested
        grads = [p.grad for p in parameters if p.grad is not None]
        flag = torch.tensor([1.0 if stop_requested else 0.0], device=grads[0].device if grads else None)
        *averaged, agreed = self._all_reduce([*grads, flag], mean=True)
        for grad, mean in zip(grads, averaged, strict=True):
            grad.copy_(mean)
        return bool(agreed > 0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a stop request between two steps, agreed by all)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])  # a CPU tensor: gloo's, in a NCCL job too
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast_module(self, module: torch.nn.Module, buffers_only: bool = False) -> None:
        """Rank 0's parameters (unless ``buffers_only``) and floating buffers on every rank."""
        if not self.active:
            return
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers() if b.is_floating_point() or not buffers_only]
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def broadcast_object(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (pickled)."""
        if not self.active:
            return value
        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def release_followers(self) -> None:
        """Rank 0: tell the other ranks (waiting in ``run.ranks.follow``) that no more seeds come; once only."""
        if self.active and self.is_main and not self.released:
            self.released = True
            self.broadcast_object(None)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def all_equal(self, value: Any) -> bool:
        """Whether every rank holds the same (picklable) ``value`` — alpha, in the tests and the bench."""
        data = pickle.dumps(value)
        return all(other == data for other in self.gather_objects(data))

    # ------------------------------------------------------------------------------------------------ batches
    def gather_batch(self, tensor: Tensor, sizes: Sequence[int]) -> Tensor:
        """The global batch's ``tensor`` from each rank's slice (``sizes[r]`` rows on rank r), with autograd: the
        backward of every rank's loss reaches each slice's own graph on its own rank (summed over ranks)."""
        if not self.active:
            return tensor
        largest = max(sizes)
        local = tensor
        if local.shape[0] < largest:  # all_gather wants equal shapes: pad, then cut each slice back
            padding = local.new_zeros((largest - local.shape[0], *local.shape[1:]))
            local = torch.cat([local, padding])
        if tensor.requires_grad:
            from torch.distributed.nn.functional import all_gather

            with warnings.catch_warnings():
                # deprecated for a private (underscored) API; this one is public and twice differentiable (HVPs)
                warnings.simplefilter("ignore", FutureWarning)
                parts = list(all_gather(local.contiguous()))
        else:
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def gather_rows(self, tensors: Sequence[Tensor], batch_rows: int | None = None) -> list[Tensor]:
        """Each tensor (rows of this rank's slice first) for the whole global batch, with autograd. They travel
        together: one all-gather per dtype, packed row by row (``[rows, features]``). ``batch_rows``: the global
        batch's size (the loader's ``batch_rows``), from which every slice's size follows without asking the other
        ranks; without it the sizes are gathered first."""
        tensors = list(tensors)
        if not self.active or not tensors:
            return tensors
        local = int(tensors[0].shape[0])
        if batch_rows is None:
            counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(counts, torch.tensor([local], dtype=torch.int64))
            sizes = [int(c) for c in counts]
        else:
            sizes = [
                stop - start for start, stop in (slice_bounds(batch_rows, r, self.world) for r in range(self.world))
            ]
        if sizes[self.rank] != local or any(t.shape[0] != local for t in tensors):
            raise RuntimeError(f"rank {self.rank}: tensors of {[t.shape[0] for t in tensors]} rows, slice {sizes}")
        gathered: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for number, tensor in enumerate(tensors):
            by_dtype.setdefault(tensor.dtype, []).append(number)
        for numbers in by_dtype.values():
            widths = [math.prod(tensors[n].shape[1:]) for n in numbers]
            packed = torch.cat([tensors[n].reshape(local, -1) for n in numbers], dim=1)
            whole = self.gather_batch(packed, sizes)
            for n, column in zip(numbers, whole.split(widths, dim=1), strict=True):
                gathered[n] = column.reshape(-1, *tensors[n].shape[1:])
        return [t for t in gathered if t is not None]

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks, the union of their keys (a rank whose share was no batch at all has
        none): the totals of a pass whose batches were shared out. Gathered as objects: a few numbers per epoch."""
        if not self.active:
            return dict(values)
        totals: dict[str, float] = {}
        for share in self.gather_objects({k: float(v) for k, v in values.items()}):
            for key, value in share.items():
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def gather_output(self, output, labels: Tensor, batch_rows: int | None = None):
        """The model's output and labels of the whole global batch, on every rank (see the module docstring).

        Every tensor whose first dimension is this slice's batch — logits, per-modality logits, embeddings, and the
        same in the methods' ``extras`` (in dicts, lists and tuples) — is gathered; other values (scalars,
        parameters) are left as they are. All of them travel together (:meth:`gather_rows`)."""
        if not self.active:
            return output, labels
        local = int(labels.shape[0])
        leaves: list[Tensor] = []

        def mark(value: Any) -> Any:  # the structure, with each batch-shaped tensor replaced by its leaf number
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == local:
                leaves.append(value)
                return _Leaf(len(leaves) - 1)
            if isinstance(value, dict):
                return {k: mark(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return type(value)(mark(v) for v in value)
            return value

        fields = {f.name: mark(getattr(output, f.name)) for f in dataclasses.fields(output)}
        label_leaf = mark(labels)
        gathered = self.gather_rows(leaves, batch_rows)

        def fill(value: Any) -> Any:
            if isinstance(value, _Leaf):
                return gathered[value.number]
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return type(value)(fill(v) for v in value)
            return value

        return dataclasses.replace(output, **{k: fill(v) for k, v in fields.items()}), fill(label_leaf)


@dataclass(frozen=True)
class _Leaf:
    number: int


def batch_rows_of(batch: dict[str, Any]) -> int | None:
    """The global batch's size, given a rank's slice of it (``ArraySplit.shard``); None for a whole batch."""
    rows = batch.get("batch_rows")
    return None if rows is None else int(rows)


def interleave_shards(shards: Sequence[Sequence[Any]]) -> list[Any]:
    """The items of a sharded sequence in their original order: item i was rank i mod N's (i // N)-th
    (``EpochBatchSampler.batch_shard``)."""
    world = len(shards)
    return [shards[i % world][i // world] for i in range(sum(map(len, shards)))]


SINGLE_PROCESS = DistributedContext()


def init_from_environment() -> DistributedContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). CUDA tensors
    travel by NCCL and CPU tensors (CPU training, the objects rank 0 broadcasts) by gloo: one group serves a run on
    either device, which the other ranks learn only from rank 0. Outside torchrun: the single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # cli/train.py has refused a malformed one
    if world <= 1:
        return SINGLE_PROCESS
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return DistributedContext(rank=rank, world=world, local_rank=local_rank)


def device_for_rank(device_name: str, context: DistributedContext) -> str:
    """Each rank's device: ``cuda:LOCAL_RANK`` for a CUDA run (one GPU per process), else the configured one."""
    if context.active and (device_name == "auto" and torch.cuda.is_available() or device_name.startswith("cuda")):
        return f"cuda:{context.local_rank}"
    return device_name


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# The file where rank 0 writes the run it records (the parent run id), so that `dmgl train --nproc N` can name it
# when the job fails; set by :func:`launch` for its workers.
# The exit status of a rank that stopped because another rank's process was gone: an effect, never the cause.
LOST_PEER_STATUS = 75

RUN_FILE_VARIABLE = "DMGL_RUN_FILE"


def note_run(run_id: str) -> None:
    """Rank 0 of a job started by :func:`launch`: tell the launcher which run is being recorded."""
    path = os.environ.get(RUN_FILE_VARIABLE)
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(run_id)


def launch(nproc: int, argv: Sequence[str]) -> None:
    """``python -m dmgl_cli ARGV`` in ``nproc`` processes on this machine through ``torch.distributed.run``
    (torchrun: a standalone rendezvous, no restarts), waiting for all of them.

    If a process fails (an error, or killed), torchrun stops the others; this raises one :class:`DmglError` naming
    each failed rank and how it ended, and the run to resume (``dmgl train --resume RUN``, with any ``--nproc``).
    CPU threads are shared out between the processes (``OMP_NUM_THREADS``, unless set)."""
    import signal
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from dmgl_cli.errors import Interrupted

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # torchrun's own notes (the CLI says what happened)
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="dmgl-launch-") as folder:
        run_file = os.path.join(folder, "run")
        os.environ[RUN_FILE_VARIABLE] = run_file
        args = parse_args(
            ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", "dmgl_cli", *argv]
        )
        try:
            run(args)
        except SignalException:  # Ctrl-C or SIGTERM: torchrun stopped the ranks, which checkpointed
            raise Interrupted(_recorded_run(run_file)) from None
        except ChildFailedError as exc:
            raise DmglError(_failure_message(exc, _recorded_run(run_file), signal)) from None
        finally:
            os.environ.pop(RUN_FILE_VARIABLE, None)


def _recorded_run(run_file: str) -> str | None:
    if not os.path.exists(run_file):
        return None
    with open(run_file, encoding="utf-8") as handle:
        return handle.read().strip() or None


def _failure_message(exc, run_id: str | None, signal_module) -> str:
    """Which rank failed first and how (the others were then stopped by torchrun), and the run to resume."""
    # torchrun stops the ranks still running with SIGTERM once one fails, and a rank whose collective lost its peer
    # exits with LOST_PEER_STATUS (often before torchrun has seen the peer go): the cause is a failure of another kind
    effects = (-signal_module.SIGTERM, LOST_PEER_STATUS)
    causes = {r: f for r, f in exc.failures.items() if f.exitcode not in effects} or exc.failures
    rank = min(causes, key=lambda r: (causes[r].timestamp, r))
    failure = causes[rank]
    code = failure.exitcode
    how = f"was killed by {signal_module.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    others = sorted(r for r in exc.failures if r != rank)
    stopped = (
        f"; torchrun then stopped rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}" if others else ""
    )
    first = f"rank {rank} (pid {failure.pid}) {how}{stopped}"
    if run_id is None:
        return f"the data-parallel job failed before it recorded a run: {first}"
    return (
        f"the data-parallel job stopped: {first}. Run {run_id} keeps its last checkpoint: continue it with "
        f"`dmgl train --resume {run_id}` (any --nproc); if it still shows RUNNING, `dmgl runs reconcile` settles it"
    )


def lost_a_rank(error: BaseException) -> bool:
    """Whether a collective failed because another rank's process is gone (its connection closed)."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "remote worker", "NCCL")
    )
