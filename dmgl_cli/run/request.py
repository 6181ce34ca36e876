"""``dmgl train``'s decisions, apart from its command line: one :class:`TrainRequest` (the command's options) and one
call, :func:`carry_out`, which chooses what to do and does it:

* under torchrun (``WORLD_SIZE`` > 1) this process is one rank: rank 0 goes on below, the others follow it
  (:mod:`dmgl_cli.run.ranks`);
* ``--resume``: refused with any option that would change the recorded run; with ``--nproc`` > 1 relaunched under
  torchrun, else resumed here (:func:`dmgl_cli.run.resume.resume`);
* otherwise the config is resolved once (a typo refused before torch or MLflow is imported), then
  ``--print-config`` returns it, ``--dry-run`` returns the plan, ``--nproc`` > 1 checks the dataset and relaunches,
  and anything else trains here (:func:`dmgl_cli.run.training.train`).

Light to import: everything heavy is imported where it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from dmgl_cli.errors import DmglError

if TYPE_CHECKING:
    from dmgl_cli.config import Config
    from dmgl_cli.distributed import DistributedContext
    from dmgl_cli.run.outcomes import Progress, StepProgress, TrainOutcome
    from dmgl_cli.run_queries import TrainPlan
    from dmgl_cli.tracking import Tracker


@dataclass(frozen=True)
class TrainRequest:
    """The options of one ``dmgl train`` (see its ``--help``), as given; None or False: not given."""

    recipe: str = "synthetic"
    strategy: str | None = None
    alpha: float | None = None
    p: float | None = None
    method: str | None = None
    modality: str | None = None
    seeds: str = "1"
    epochs: int | None = None
    overrides: tuple[str, ...] = ()
    experiment: str | None = None
    run_name: str | None = None
    resume_run: str | None = None
    deterministic: bool = False
    print_config: bool = False
    dry_run: bool = False
    nproc: int | None = None
    tracking_uri: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainRequest:
        """The request of a command's keyword options (other keys, such as output flags, are left out)."""
        known = {f.name for f in fields(cls)}
        given: dict[str, Any] = {k: (tuple(v) if k == "overrides" else v) for k, v in options.items() if k in known}
        return cls(**given)


@dataclass
class TrainFeedback:
    """What the caller hears while training: per epoch, per batch, and once the parent run is recorded
    (``on_parent(parent_id, config, seeds, tracker)``)."""

    progress: Progress | None = None
    step_progress: StepProgress | None = None
    on_parent: Callable[[str, Config, list[int], Tracker], None] | None = None


@dataclass
class TrainReply:
    """What ``dmgl train`` did; all None for a launcher (``--nproc``: rank 0 printed) and the following ranks."""

    config: Config | None = None  # --print-config: the resolved config, nothing trained
    plan: TrainPlan | None = None  # --dry-run: the runs it would create
    outcome: TrainOutcome | None = None  # trained or resumed
    tracker: Tracker | None = None  # the store the outcome is recorded in


# --resume continues the recorded config: these options would change it
_RESUME_CONFLICTS = (
    ("--strategy", "strategy"),
    ("--alpha", "alpha"),
    ("--p", "p"),
    ("--method", "method"),
    ("--modality", "modality"),
    ("--epochs", "epochs"),
    ("--experiment", "experiment"),
    ("--name", "run_name"),
    ("--deterministic", "deterministic"),
    ("--print-config", "print_config"),
    ("--dry-run", "dry_run"),
    ("--set", "overrides"),
)


def carry_out(request: TrainRequest, feedback: TrainFeedback | None = None) -> TrainReply:
    """Do what ``request`` asks (see the module docstring) and say what was done."""
    from dmgl_cli.run.ranks import as_rank, launched_world_size

    feedback = feedback or TrainFeedback()
    nproc = request.nproc or 1
    if launched_world_size() > 1:  # one rank of a data-parallel job (torchrun, or --nproc's relaunch)
        if nproc > 1:
            raise DmglError(
                "--nproc starts its own processes; under torchrun, leave it out (torchrun sets their number)"
            )
        replies: list[TrainReply] = []
        as_rank(lambda distributed: replies.append(_carry_out(request, feedback, 1, distributed)))
        return replies[0] if replies else TrainReply()
    return _carry_out(request, feedback, nproc, None)


def _carry_out(
    request: TrainRequest, feedback: TrainFeedback, nproc: int, distributed: DistributedContext | None
) -> TrainReply:
    """``dmgl train`` in this process, or, with ``nproc`` > 1, in ``nproc`` processes launched on the same command
    line; ``distributed``: this process's rank in a data-parallel job."""
    from dmgl_cli.run.ranks import relaunch

    if request.resume_run:
        check_resume_alone(request)
        if nproc > 1:
            relaunch(nproc)
            return TrainReply()
        return _resume(request, feedback, distributed)
    if request.print_config and request.dry_run:
        raise DmglError("--print-config and --dry-run each print and exit; give one")
    config, seeds = resolve_request(request)
    if request.print_config:
        return TrainReply(config=config)
    if request.dry_run:
        from dmgl_cli.run_queries import train_plan

        return TrainReply(plan=train_plan(config, seeds, request.run_name))
    if nproc > 1:
        from dmgl_cli.run.training import open_checked_dataset
        from dmgl_cli.train_setup import check_data_parallel

        check_data_parallel(config, nproc)  # before any process starts
        open_checked_dataset(config)
        relaunch(nproc)
        return TrainReply()
    return _train(request, config, seeds, feedback, distributed)


def check_resume_alone(request: TrainRequest) -> None:
    """Refuse ``--resume`` given with options that would change the recorded run (naming every one)."""
    given = [flag for flag, name in _RESUME_CONFLICTS if _given(getattr(request, name))]
    if given:
        raise DmglError(f"--resume continues a recorded run with its recorded config; drop {', '.join(given)}")


def _given(value: object) -> bool:
    """Whether an option was given: not None, not an unset flag, not an empty ``--set`` (``--alpha 0`` is given,
    though ``0 == False``)."""
    return value is not None and value is not False and value != ()


def resolve_request(request: TrainRequest) -> tuple[Config, list[int]]:
    """The request's one resolved config and its seeds (counted from ``train.seed``); only light modules load, so a
    typo is refused before torch or MLflow is imported."""
    from dmgl_cli.config import parse_seeds, resolve
    from dmgl_cli.paths import safe_name
    from dmgl_cli.strategies import spec_from_flags

    parse_seeds(request.seeds, 0)  # its form, before the config loads; the count starts at train.seed below
    for what, name in (("run name", request.run_name), ("experiment", request.experiment)):
        if name is not None:
            safe_name(name, what)
    settings = {
        key: value
        for key, value in (
            ("train.epochs", request.epochs),
            ("experiment", request.experiment),
            ("train.deterministic", request.deterministic or None),
        )
        if value is not None
    }
    config = resolve(
        request.recipe,
        request.overrides,
        strategy=spec_from_flags(request.strategy, request.alpha, request.p),
        method=request.method,
        modality=request.modality,
        settings=settings,
    )
    return config, parse_seeds(request.seeds, config.train.seed)


def _resume(request: TrainRequest, feedback: TrainFeedback, distributed: DistributedContext | None) -> TrainReply:
    from dmgl_cli.tracking import Tracker

    tracker = Tracker(request.tracking_uri)
    assert request.resume_run is not None
    run_id = tracker.find_run(request.resume_run).run_id  # an unknown or ambiguous one: refused before torch loads

    from dmgl_cli.distributed import SINGLE_PROCESS, note_run
    from dmgl_cli.run import resume

    note_run(run_id)
    outcome = resume.resume(
        run_id,
        tracker=tracker,
        progress=feedback.progress,
        step_progress=feedback.step_progress,
        distributed=distributed or SINGLE_PROCESS,
    )
    return TrainReply(outcome=outcome, tracker=tracker)


def _train(
    request: TrainRequest,
    config: Config,
    seeds: list[int],
    feedback: TrainFeedback,
    distributed: DistributedContext | None,
) -> TrainReply:
    from dmgl_cli.data.registry import open_dataset

    open_dataset(config.dataset)  # an unprepared dataset is refused before MLflow and the trainer load

    from dmgl_cli.tracking import Tracker

    tracker = Tracker(request.tracking_uri)  # an unreachable server is refused before torch loads

    from dmgl_cli.distributed import SINGLE_PROCESS, note_run
    from dmgl_cli.run import training

    def on_parent(parent_id: str) -> None:
        note_run(parent_id)
        if feedback.on_parent is not None:
            feedback.on_parent(parent_id, config, seeds, tracker)

    outcome = training.train(
        config,
        seeds,
        tracker=tracker,
        progress=feedback.progress,
        step_progress=feedback.step_progress,
        run_name=request.run_name,
        on_parent=on_parent,
        distributed=distributed or SINGLE_PROCESS,
    )
    return TrainReply(outcome=outcome, tracker=tracker)
