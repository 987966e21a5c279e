# SpecRelay CPU demo: target server (HF backend) and trainer in one small image, with a tiny
# Llama and a chat dataset baked in, for laptops, CI clusters (kind/minikube) and the
# k8s cpu-demo overlay.
#   docker build -f deploy/docker/cpu-demo.Dockerfile -t specrelay/cpu-demo:0.1.0 .
#   docker run --rm specrelay/cpu-demo:0.1.0                   # the whole demo in one container
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=2 \
    HOME=/home/specrelay

RUN groupadd --system --gid 10001 specrelay \
    && useradd --system --uid 10001 --gid specrelay --create-home --home-dir /home/specrelay specrelay

# jemalloc: SpecRelay's CLIs run on it when present (common/memory.py; 1.1-1.2x the trainer's tokens per
# CPU-second of glibc's malloc here, benchmarks/results/allocator_demo.md).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2=5.3.0-1 \
    && rm -rf /var/lib/apt/lists/*

# CPU torch first, from the CPU index: a bare torch requirement pulls a multi-GB CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /opt/specrelay
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY common ./common
COPY target_server ./target_server
COPY draft_trainer ./draft_trainer
# The project itself (a local path, so DL3013 does not apply); its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[plots]"
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/specrelay-healthcheck
COPY deploy/docker/demo_assets.py /opt/specrelay/deploy/docker/demo_assets.py
RUN python deploy/docker/demo_assets.py --output /opt/specrelay/demo \
    && chown -R specrelay:specrelay /opt/specrelay/demo

USER 10001:10001
EXPOSE 50051 50052 9400
# Healthy when a target server runs in the container (the k8s overlay and compose run one);
# the default command (the all-in-one demo) starts its own server on free loopback ports.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/specrelay-healthcheck", "grpc", "--port", "50051"]
CMD ["draft-trainer", "train", "data.path=/opt/specrelay/demo/data", "targets.embedded_model=/opt/specrelay/demo/model", "output_dir=/home/specrelay/runs/demo", "max_steps=60", "batch_size=4", "epochs=100", "optim.lr=3e-3", "model.ttt_steps=3", "resume_from=auto"]
