# syntax=docker/dockerfile:1.7
# autopipeline-grpc server image (see README "Container and Kubernetes").
#
# GPU (default): docker build -t autopipeline-grpc .
# CPU only:      docker build -t autopipeline-grpc:cpu \
#                  --build-arg BASE_IMAGE=ubuntu:24.04 \
#                  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Run:           docker run --gpus all -p 50051:50051 -v autopipeline-cache:/var/cache/autopipeline \
#                  autopipeline-grpc serve --model photoreal=dreamlike-art/dreamlike-photoreal-2.0
#
# Stages: `python` (OS packages, shared) -> `requirements` (dependency list from pyproject.toml)
# -> `deps` (a venv with torch and every dependency) -> `wheel` (the project, built from the sources)
# -> `runtime` (python + the deps venv + the wheel). Source edits rebuild only `wheel` and the last
# runtime layers: the multi-GB dependency layer stays cached, and unchanged for anyone pulling.

# The CUDA "base" flavour: the CUDA runtime (cudart) and the NVIDIA_* variables the container
# toolkit needs to mount the host's driver. torch's CUDA wheels bring their own cuBLAS/cuDNN, so
# the larger "runtime" flavour would only duplicate gigabytes. Keep its CUDA version in step with
# TORCH_INDEX_URL (cu128 = CUDA 12.8). Any Ubuntu 24.04-based image works (python3 is 3.12).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A C/C++ compiler and Python headers stay in the runtime image on purpose: torch.compile's
# Triton (GPU) and C++ (CPU) backends build small extensions at run time.
# The base image pins the OS release; pinning each package's version would break on security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-dev gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*

FROM python AS requirements
# Only the dependency list, so editing anything else in pyproject.toml keeps the `deps` cache.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" > /requirements.txt

FROM python AS deps
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The torch wheel index decides the accelerator build: cu128 by default, .../whl/cpu for CPU images.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_REQUIREMENT="torch>=2.4,<3"
# torch first, from its own index: a bare requirement from PyPI might pick another accelerator build.
# The requirement is a range (as in pyproject.toml) given by a build argument, so DL3013 cannot see it.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" "$TORCH_REQUIREMENT"
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/requirements.txt

FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client/ client/
COPY server/ server/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

FROM python AS runtime
# Models (hub downloads or checkpoints copied there) and compile caches live on one mounted volume,
# so a restarted container neither downloads nor compiles again.
ENV PATH=/opt/venv/bin:$PATH \
    XDG_CACHE_HOME=/var/cache/autopipeline \
    HF_HOME=/var/cache/autopipeline/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/autopipeline/inductor \
    TRITON_CACHE_DIR=/var/cache/autopipeline/triton
RUN useradd --create-home --uid 10001 --user-group autopipeline \
 && mkdir -p "$HF_HOME" "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR" \
 && chown -R 10001:10001 /var/cache/autopipeline
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl
# A default configuration; Kubernetes mounts its ConfigMap over it (deploy/kubernetes/).
COPY examples/config.toml /etc/autopipeline/config.toml

USER 10001:10001
WORKDIR /home/autopipeline
VOLUME ["/var/cache/autopipeline"]
# 50051: gRPC (Generate, Inspect, health, reflection). 9090: Prometheus /metrics with --metrics-port 9090.
EXPOSE 50051 9090
# `health` imports grpc and grpc_health only (about 0.1 s), never torch. Models load and compile
# before health turns SERVING: large checkpoints need the long start period.
# Health needs no token. With TLS, override this in a derived image or compose file, adding
# --tls-ca (and --tls-cert/--tls-key for mutual TLS; --tls-server-name if the certificate
# does not name localhost).
HEALTHCHECK --interval=15s --timeout=6s --start-period=30m --retries=3 \
  CMD ["autopipeline-server", "health", "--target", "localhost:50051"]
# SIGTERM drains: in-flight requests get --grace seconds, new ones get UNAVAILABLE.
STOPSIGNAL SIGTERM
ENTRYPOINT ["autopipeline-server"]
CMD ["serve", "--config", "/etc/autopipeline/config.toml"]
