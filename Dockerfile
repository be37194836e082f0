# syntax=docker/dockerfile:1
# The ranker serving image: `ranker serve` on port 8000, reading a bundle from /bundle.
#
#   CPU (default):  docker build -t ranker:0.1.0 .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t ranker:0.1.0-cuda .
#   run:            docker run -p 8000:8000 -v "$PWD/runs/bundle:/bundle:ro" ranker:0.1.0
#
# TORCH_VARIANT is the suffix of PyTorch's wheel index (cpu, cu126, cu128, ...); choose one
# that PyTorch publishes for TORCH_VERSION. CUDA wheels carry their own CUDA runtime, so the
# same slim base serves both; a GPU host needs only the driver and the NVIDIA container toolkit.
# Extra arguments go to `ranker serve`: `docker run ... ranker:0.1.0-cuda --device cuda`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with torch and the package, copied whole into the runtime ----
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first and from its own index: left to `pip install .`, PyPI would supply the
# multi-GB CUDA build even for a CPU image. It satisfies pyproject's torch pin, so the
# next step keeps it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ranker/ ranker/
RUN pip install . \
    && python -c "import torch, ranker; print('torch', torch.__version__)"

# ---- runtime: no compilers, no sources, a non-root user ----
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 ranker \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ranker \
       --shell /usr/sbin/nologin ranker
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RANKER_BUNDLE=/bundle
# No VOLUME: an anonymous volume would hide a bundle baked in by `FROM ranker ... COPY`.
# Mount the bundle at /bundle (or anywhere, and set RANKER_BUNDLE).
USER 10001:10001
WORKDIR /home/ranker
EXPOSE 8000
# python + urllib: the slim image has no curl. urlopen raises on a non-2xx answer -> exit 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RANKER_PORT', '8000'), timeout=4)"]
# sh -c so ${RANKER_BUNDLE}, ${RANKER_HOST} and ${RANKER_PORT} expand at run time (set the port
# with -e RANKER_PORT=..., which the HEALTHCHECK reads too); exec so ranker is PID 1 and gets SIGTERM;
# "$@" appends `docker run` / k8s `args` (e.g. --device cuda) to the command.
ENTRYPOINT ["/bin/sh", "-c", "exec ranker serve --bundle \"${RANKER_BUNDLE:-/bundle}\" --host \"${RANKER_HOST:-0.0.0.0}\" --port \"${RANKER_PORT:-8000}\" \"$@\"", "ranker"]
CMD []
