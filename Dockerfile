# The Weir gateway alone, for CPU nodes (Kubernetes: the chart's gateway Deployment).
# No torch, no vLLM: engines run elsewhere (Dockerfile.cuda) and are found by DNS.
# Build: docker build -t weir-gateway .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/weir
COPY pyproject.toml README.md weir.toml ./
COPY serving ./serving
COPY models ./models
COPY retrieval ./retrieval
COPY bench ./bench
# The base install is the gateway (fastapi, uvicorn, aiohttp, redis, tokenizers, ...);
# faiss-cpu for retrieval's indexes (the chart's index workers run this image too).
RUN pip install . "faiss-cpu>=1.9" && useradd --system --uid 10001 weir && mkdir -p /etc/weir \
    && cp weir.toml /etc/weir/weir.toml
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
ENTRYPOINT ["weir", "--config", "/etc/weir/weir.toml"]
CMD ["serve", "--host", "0.0.0.0"]
