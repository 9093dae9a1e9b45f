# syntax=docker/dockerfile:1.7
# One image for all seven services (ingest, inference, scorer, review, export, identity, web);
# pick the service with the command:
#   docker run tandem:0.1.0 python -m services.ingest
# Build:  docker build -t tandem:0.1.0 .
# GPU variant (vLLM inference), see deploy/k8s/README.md:
#   docker build -t tandem-gpu:0.1.0 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg EXTRA_PIP_PACKAGES="vllm==<version built against torch 2.13.0>" .

ARG PYTHON_IMAGE=python:3.11-slim

############################ build ############################
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
# CPU wheels by default, so pip does not pull the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRA_PIP_PACKAGES=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python -m venv /app/.venv \
 && pip install --upgrade pip setuptools wheel

# 1. torch from the selected index first; the pin in pyproject.toml is then already satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2. Third-party dependencies only (cached until pyproject.toml changes).
#    mypy-protobuf is needed by `make proto` and removed again below.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = list(p['dependencies']) + [d for d in p.get('optional-dependencies', {}).get('dev', []) if d.startswith('mypy-protobuf')]; \
print('\n'.join(deps))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && if [ -n "${EXTRA_PIP_PACKAGES}" ]; then pip install --extra-index-url "${TORCH_INDEX_URL}" ${EXTRA_PIP_PACKAGES}; fi

# 3. Source, generated gRPC code, and the project itself.
#    The services run from /app (the working directory comes first on sys.path with `python -m`),
#    so the data files they read there travel with this COPY: migrations/<schema>/*.sql and the
#    web app's services/web/templates/ and services/web/static/ (see .dockerignore for what stays out).
#    The stamp tells the Makefile the venv is already provisioned, so `make proto` only runs
#    protoc (with /app/.venv, where the Makefile expects it) instead of installing dev tools.
COPY . .
RUN touch /app/.venv/.installed \
 && make proto \
 && pip install --no-deps . \
 && pip uninstall -y mypy-protobuf \
 && python -m compileall -q services

############################ runtime ############################
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="tandem" \
      org.opencontainers.image.description="Tandem: LLMs and people labeling data in tandem" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    TANDEM_BIND_HOST=0.0.0.0

RUN groupadd --system --gid 10001 tandem \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tandem

WORKDIR /app
# Owned by root and read-only for the service user; only /tmp needs to be writable.
COPY --from=build /app /app

USER 10001:10001

# gRPC 50051-50057, ops HTTP (/metrics, /livez, /readyz) 8081-8087, web app 8080
EXPOSE 50051-50057 8081-8087 8080

CMD ["python", "-m", "services.ingest"]
