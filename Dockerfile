# relay: API + workers in one process, SQLite and images under /data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RELAY_SERVER_HOST=0.0.0.0 RELAY_SERVER_PORT=8080 RELAY_STORAGE_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /data relay \
    && mkdir -p /data && chown relay /data

USER relay
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"

# Mount a config file and point RELAY_CONFIG at it, e.g. -v ./relay.toml:/etc/relay.toml -e RELAY_CONFIG=/etc/relay.toml
CMD ["relay", "serve"]
