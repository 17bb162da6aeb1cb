# The image every Airflow service of docker-compose.yaml runs. Everything is installed
# at build time from the pinned requirements; nothing is installed when a container starts.
#   docker build -t alexnet-cifar10 .                                          # CPU (default)
#   docker build -t alexnet-cifar10-gpu --build-arg REQUIREMENTS=requirements-gpu.txt \
#                --build-arg CONSTRAINTS=constraints-gpu.txt .                  # GPU
# constraints.txt pins the CPU resolution; constraints-gpu.txt the GPU one, TensorFlow and
# every nvidia-* library included (regenerate it with scripts/pin_gpu_constraints.py).
FROM apache/airflow:3.3.2-python3.11

ARG REQUIREMENTS=requirements.txt
ARG CONSTRAINTS=constraints.txt
COPY --chown=airflow:root requirements.txt requirements-base.txt requirements-gpu.txt constraints.txt constraints-gpu.txt /opt/alexnet/
RUN pip install --no-cache-dir -r /opt/alexnet/${REQUIREMENTS} -c /opt/alexnet/${CONSTRAINTS}

COPY --chown=airflow:root pyproject.toml /opt/alexnet/
COPY --chown=airflow:root alexnet_tasks /opt/alexnet/alexnet_tasks
RUN pip install --no-cache-dir --no-deps /opt/alexnet

COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
COPY --chown=airflow:root deploy /opt/alexnet/deploy

ENV ALEXNET_ARTIFACTS=/opt/alexnet-artifacts
