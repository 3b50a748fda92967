FROM python:3.11-slim
# TORCH_SPEC picks the torch build: a CUDA wheel for GPU workers (e.g. "torch==2.13.0"
# from the CUDA index), the CPU build for API-only images.
ARG TORCH_SPEC=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md celeryconfig.py ./
COPY api api
COPY cli cli
COPY core core
COPY models models
COPY schemas schemas
COPY tasks tasks
COPY workers workers
RUN pip install .
RUN useradd --create-home inferq && mkdir -p /data/files && chown inferq /data/files
USER inferq
