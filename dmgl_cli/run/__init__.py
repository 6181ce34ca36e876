"""A run's lifecycle, one module per job; what ``dmgl train`` / ``--resume`` / ``eval`` / ``register`` do.

* :mod:`~dmgl_cli.run.request` — ``dmgl train``'s choices (print the config, a dry run, resume, launch ranks, train)
  from one :class:`~dmgl_cli.run.request.TrainRequest`; light to import (the config is resolved before torch loads).
* :mod:`~dmgl_cli.run.training` — train a config over seeds under one parent run (:func:`~.training.train`).
* :mod:`~dmgl_cli.run.resume` — continue an interrupted run in the same MLflow runs.
* :mod:`~dmgl_cli.run.ranks` — the data-parallel ranks: rank 0's role, the followers, the ``--nproc`` relaunch.
* :mod:`~dmgl_cli.run.scoring` — ``dmgl eval``, ``dmgl register``, ``dmgl runs reconcile``.
* :mod:`~dmgl_cli.run.summary` — the parent's mean ± std, alpha plot and markdown description.
* :mod:`~dmgl_cli.run.outcomes` — what these return (and the progress callbacks they take).

A recorded run's model is rebuilt by :mod:`dmgl_cli.recorded`. Nothing is imported here, so that importing
:mod:`~dmgl_cli.run.request` stays light.
"""
