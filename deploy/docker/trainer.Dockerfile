# SpecRelay draft trainer (GPU): CUDA torch from PyPI (it bundles the CUDA runtime and NCCL; the
# node needs only the NVIDIA driver and container toolkit) plus the project.
#   docker build -f deploy/docker/trainer.Dockerfile -t specrelay/trainer:0.1.0 .
# Launched by torchrun (Kubernetes Indexed Job, compose) or by Ray Train (deploy/ray).
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/specrelay

RUN groupadd --system --gid 10001 specrelay \
    && useradd --system --uid 10001 --gid specrelay --create-home --home-dir /home/specrelay specrelay

# torch first, pinned: the project's torch range would otherwise float.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /opt/specrelay
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY common ./common
COPY target_server ./target_server
COPY draft_trainer ./draft_trainer
# The project itself (a local path, so DL3013 does not apply); its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[plots]" \
    && python -c "import torch, draft_trainer.train.loop; print('torch', torch.__version__)"
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/specrelay-healthcheck

USER 10001:10001
# 29500 torchrun rendezvous (c10d store on node 0), 9400+ Prometheus /metrics (base + local rank).
EXPOSE 29500 9400
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/bin/specrelay-healthcheck", "http", "--url", "http://127.0.0.1:9400/metrics"]
ENTRYPOINT ["draft-trainer"]
CMD ["train", "--help"]
