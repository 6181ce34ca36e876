"""The data-parallel ranks of ``dmgl train``: which role this process has (torchrun's ``WORLD_SIZE``/``RANK``),
what the ranks other than 0 do (:func:`follow`: train each seed rank 0 announces, recording nothing) and the
``--nproc N`` relaunch of the same command line under ``torch.distributed.run``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.distributed import DistributedContext


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun); read without importing torch."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit():
        raise DmglError(f"WORLD_SIZE={value!r} is not a number of processes")
    return int(value)


def relaunch(nproc: int, argv: list[str] | None = None) -> None:
    """This same command line (``argv``, default ``sys.argv[1:]``) in ``nproc`` processes (torchrun), ``--nproc``
    left out; rank 0 prints."""
    from dmgl_cli.distributed import launch

    kept, skip = [], False
    for token in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            kept.append(token)
    if "train" not in kept:
        raise DmglError("--nproc needs the dmgl command line (`dmgl train ... --nproc N`)")
    launch(nproc, kept)


def as_rank(train_on_rank_0: Callable[[DistributedContext], Any]) -> None:
    """This process as one rank of a data-parallel job: rank 0 runs ``train_on_rank_0`` (what a single process does,
    with the other ranks training alongside); the others :func:`follow` and record and print nothing. A normal exit
    from rank 0 that trained nothing (--print-config, --dry-run, finished runs) releases them; an error leaves them
    to torchrun, which stops them once rank 0 exits."""
    from dmgl_cli.distributed import LOST_PEER_STATUS, RUN_FILE_VARIABLE, init_from_environment, lost_a_rank
    from dmgl_cli.errors import Interrupted

    distributed = init_from_environment()
    # Stopped by Ctrl-C or SIGTERM: rank 0 says so, unless `dmgl train --nproc` launched it (the launcher does).
    quiet = not distributed.is_main or RUN_FILE_VARIABLE in os.environ
    try:
        if not distributed.is_main:
            follow(distributed)
            return
        train_on_rank_0(distributed)
    except (KeyboardInterrupt, Interrupted):
        raise Interrupted(quiet=quiet) from None
    except RuntimeError as exc:
        if not lost_a_rank(exc):
            raise
        # another rank died: `dmgl train --nproc` (or torchrun) reports which; rank 0 of another torchrun says so
        # in one line, not with the collective's traceback
        if quiet:
            raise SystemExit(LOST_PEER_STATUS) from None
        raise DmglError(
            f"rank {distributed.rank} stopped: another rank of the job is gone (its connection closed)"
        ) from None
    distributed.release_followers()


class _NoRecords:
    """The sink of ranks other than 0: they record nothing (rank 0 logs the metrics and writes the checkpoints)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> None:
        pass


def follow(distributed: DistributedContext) -> int:
    """A data-parallel rank other than 0: train each seed rank 0 announces (its config and the state it resumes
    from) until rank 0 says there are no more; returns the number of seeds trained. Never touches MLflow."""
    from dmgl_cli.config import config_from_yaml
    from dmgl_cli.data.registry import open_dataset
    from dmgl_cli.run.training import graceful_stop
    from dmgl_cli.train import Trainer

    trained = 0
    while (job := distributed.broadcast_object()) is not None:
        config = config_from_yaml(job["config"])
        dataset = open_dataset(config.dataset)
        if dataset.checksum != job["dataset_checksum"]:  # another machine's copy, prepared differently
            raise DmglError(
                f"rank {distributed.rank}: dataset {config.dataset!r} here (checksum {dataset.checksum[:12]}) is not "
                f"rank 0's ({job['dataset_checksum'][:12]}); prepare it with the same options on every machine"
            )
        holder: dict[str, Trainer] = {}
        with graceful_stop(holder):
            trainer = holder["trainer"] = Trainer(
                config, dataset, config.train.seed, _NoRecords(), distributed=distributed
            )
            if job["state"] is not None:
                trainer.load_state_dict(job["state"], "rank 0's checkpoint")
            trainer.fit()
        trained += 1
    return trained
