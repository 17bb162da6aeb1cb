"""The steps of the alexnet_cifar10 pipeline, each a plain function usable without Airflow.

download -> split -> build_shards -> train -> evaluate -> publish; settings and
the artifact layout live in ``alexnet_tasks.config``.
"""
