"""The steps of the alexnet_cifar10 pipeline, each a plain function usable without Airflow.

The package is layered; a module imports only from its own layer or the ones
below it (``tests/test_layers.py`` checks)::

    ops/        alerts, worker identity
    release/    gate, publish, retention
    evaluate    test-split scores, predictions, pictures
    training/   train (the orchestrator), recipe, model, feeding, callbacks, checkpoints, fingerprint
    data/       download, split, shards
    config, atomic, errors, progress    settings and layout, atomic files and locks, the error kinds,
                                        the progress lines a local run shows

download -> split -> build_shards -> train -> evaluate -> gate -> publish;
settings and the artifact layout live in ``alexnet_tasks.config``.
"""
