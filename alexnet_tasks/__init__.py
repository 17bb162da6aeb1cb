"""The steps of the alexnet_cifar10 pipeline, each a plain function usable without Airflow.

The package is layered; a module imports only from its own layer or the ones
below it (``tests/test_layers.py`` checks)::

    ops/        alerts, worker identity
    release/    gate, publish, retention
    evaluate    test-split scores, predictions, pictures
    training/   train (the orchestrator), recipe, model, feeding, callbacks, checkpoints, fingerprint
    data/       download, split, shards
    config, validation, recipes, atomic, jsonio, errors
                settings and layout, the params' check, the recipes' defaults, atomic files
                and locks, JSON files, the error kinds

download -> split -> build_shards -> train -> evaluate -> gate -> publish;
settings and the artifact layout live in ``alexnet_tasks.config``.
"""
