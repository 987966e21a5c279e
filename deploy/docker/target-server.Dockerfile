# SpecRelay target server on GPU nodes: SpecRelay on top of the pinned SGLang image, so the
# sglang backend runs SGLang's own model code, kernels and tensor parallelism.
#   docker build -f deploy/docker/target-server.Dockerfile -t specrelay/target-server:0.1.0 .
# The base tag matches the `sglang` extra in pyproject.toml (sglang==0.5.23, CUDA 13). For
# reproducible builds pin it by digest as well: --build-arg SGLANG_IMAGE=lmsysorg/sglang:v0.5.23@sha256:...
ARG SGLANG_IMAGE=lmsysorg/sglang:v0.5.23
FROM ${SGLANG_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HOME=/home/specrelay

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN groupadd --system --gid 10001 specrelay \
    && useradd --system --uid 10001 --gid specrelay --create-home --home-dir /home/specrelay specrelay

WORKDIR /opt/specrelay
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY common ./common
COPY target_server ./target_server
COPY draft_trainer ./draft_trainer
# Keep the image's torch/SGLang/kernels exactly as shipped: constrain them to the installed versions.
RUN python3 -m pip freeze | grep -iE '^(torch|triton|sglang|sgl-kernel|flashinfer[a-z_-]*|transformers)==' > /tmp/keep.txt \
    && python3 -m pip install --no-cache-dir -c /tmp/keep.txt . \
    && rm /tmp/keep.txt \
    && python3 -c "import sglang, target_server.server; print('sglang', sglang.__version__)"
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/specrelay-healthcheck

USER 10001:10001
# 50051 gRPC control plane, 50052 Arrow Flight data plane, 9400 Prometheus /metrics.
EXPOSE 50051 50052 9400
# Model loading on a large GPU takes minutes: a long start period before failures count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "/usr/local/bin/specrelay-healthcheck", "grpc", "--port", "50051"]
# Binding all interfaces is explicit (the server's default is loopback).
ENTRYPOINT ["target-server", "serve"]
CMD ["--backend", "sglang", "--device", "cuda", "--dtype", "bf16", "--host", "0.0.0.0", "--model", "/models/target"]
