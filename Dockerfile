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
# The port and scheme relay serves (-e RELAY_SERVER_PORT / RELAY_SERVER_SSL_CERTFILE change them); a liveness probe
# on the loopback, so the certificate's name is not checked.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os,ssl,sys,urllib.request as u; tls=bool(os.environ.get('RELAY_SERVER_SSL_CERTFILE')); url=('https' if tls else 'http')+'://127.0.0.1:'+os.environ.get('RELAY_SERVER_PORT','8080')+'/healthz'; sys.exit(0 if u.urlopen(url, timeout=2, context=ssl._create_unverified_context() if tls else None).status == 200 else 1)"

# Mount a config file and point RELAY_CONFIG at it, e.g. -v ./relay.toml:/etc/relay.toml -e RELAY_CONFIG=/etc/relay.toml
CMD ["relay", "serve"]
