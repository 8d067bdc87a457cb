# Style-transfer TorchServe image with the real ImageNet VGG19 weights baked in.
#   docker build -t style-transfer .
#   docker run --rm -p 127.0.0.1:8080-8082:8080-8082 style-transfer          (CPU)
#   docker run --rm --gpus all -p 127.0.0.1:8080-8082:8080-8082 style-transfer  (GPU)
# torch 2.14.1 from PyPI is the CUDA build, so one image serves both; the GPU
# run needs the NVIDIA Container Toolkit on the host.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Java 17 runs TorchServe's frontend; tini is PID 1 (below). Debian's point
# releases carry security fixes, so the packages are not pinned to one build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 model-server
WORKDIR /home/model-server

COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY handler handler
COPY scripts scripts
COPY config.properties metrics.yaml ./

# --require-imagenet: the build fails rather than ship random weights. The
# download cache is dropped in the same layer; the archive keeps its own copy.
# config.properties' workflow_store is made last, owned by root and read-only,
# so the server's user can put nothing in it. HTTP binds 0.0.0.0 inside the
# container; gRPC stays on its loopback: TorchServe cannot refuse
# StreamPredictions2, one call of which leaves the model without a worker,
# so gRPC goes out only through a gateway that filters methods (deploy/).
RUN python scripts/fetch_weights.py --require-imagenet --out weights/vgg19_features.pth \
 && VENV=/usr/local scripts/build_mar.sh \
 && rm -rf weights /root/.cache \
 && sed -i 's#http://127.0.0.1:#http://0.0.0.0:#' config.properties \
 && chown -R model-server:model-server /home/model-server \
 && mkdir -m 0555 workflow_store

USER 10001
EXPOSE 8080 8081 8082

# /ping needs the inference key, and the worker check (describe: a READY
# worker, since /ping stays healthy while a worker fails to load) the
# management key; TorchServe writes both to ./key_file.json at start and they
# expire after token_expiration_min: the check renews an expired one (with the
# API key, which never expires) before it asks.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "scripts/manage.py", "--timeout", "8", "wait", "--renew-expired"]

# `torchserve --foreground` is a Python launcher that waits on the Java
# frontend and handles no signal: as PID 1 it ignored SIGTERM (the kernel
# drops signals PID 1 has no handler for), so `docker stop` and every pod
# stop waited out their grace period and then killed it. tini, as PID 1,
# sends the signal to the whole process group (-g): the frontend runs its
# shutdown and stops the workers, and tini reaps them.
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "config.properties"]
