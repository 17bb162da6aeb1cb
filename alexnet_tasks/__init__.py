"""The steps of the alexnet_cifar10 pipeline, each a plain function usable without Airflow.

The package is layered; a module imports only from its own layer or the ones
below it (``tests/test_layers.py`` checks)::

    dag_tasks   what the DAGs' tasks share: retry policy, progress callbacks, a task's config, the step bodies
    ui/         the results pages' view model and charts (for plugins/alexnet_results.py)
    ops/        alerts, worker identity
    release/    registry of published/, gate, publish, retention
    evaluate    test-split scores, predictions, pictures
    training/   train (the orchestrator), recipe, model, memory, feeding, callbacks, checkpoints, fingerprint
    data/       download, split, shards
    config, validation, recipes, layout, atomic, jsonio, errors, progress, sweeps
                the config, the params' check, the recipes' defaults, every artifact's name,
                atomic files and locks, JSON files, the error kinds, the progress lines a local run shows,
                a sweep's trials

download -> split -> build_shards -> train -> evaluate -> gate -> publish;
the config (``PipelineConfig``: the form's params, validated) lives in
``alexnet_tasks.config``, the hyperparameters a run trains with are resolved from it in
``alexnet_tasks.training.recipe``, the artifact layout in ``alexnet_tasks.layout``.

Every step takes the same shape of arguments: what it reads, then the folder
it writes (an output folder or the artifacts root), then the config; anything
else is keyword-only, e.g. ``gate(shards_dir, published_root, run_dir, config,
run_id=...)`` and ``publish(run_dir, published_root, config, run_id=...)``.
"""
