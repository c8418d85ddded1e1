# Build the wheel (the package data — RADIUS dictionary, default and example
# configs — goes inside it), then install only the wheel: the image runs the
# product as a pip install does, with no checkout.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY backends ./backends
COPY policy ./policy
COPY conf ./conf
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=wheel /wheels /wheels
# [postgres]: the psycopg driver, for several instances sharing one PostgreSQL state.
RUN pip install --no-cache-dir "$(ls /wheels/mfa_proxy-*.whl)[postgres]" && rm -rf /wheels \
 && useradd --system --home-dir /var/lib/mfa-proxy --shell /usr/sbin/nologin mfa-proxy \
 && install -d -o mfa-proxy -g mfa-proxy -m 0700 /var/lib/mfa-proxy \
 && install -d -m 0755 /etc/mfa-proxy
USER mfa-proxy
WORKDIR /var/lib/mfa-proxy
VOLUME /var/lib/mfa-proxy
EXPOSE 1812/udp 1813/udp 3389 9812
# `serve` looks for $MFA_PROXY_CONFIG, ./conf/mfa-proxy.toml (none here), then
# /etc/mfa-proxy/mfa-proxy.toml: mount the config folder there, read-only
# (`mfa-proxy init-config --example docker -` prints a start: 0.0.0.0 listeners,
# state under /var/lib/mfa-proxy), and a volume at /var/lib/mfa-proxy.
# /healthz answers while the process runs ([http] listen, 9812 in the docker example).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9812/healthz', timeout=4)"]
# SIGTERM drains ([service] shutdown_grace_seconds, default 10): give `docker stop`
# a longer timeout than that (docker stop -t 20, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
CMD ["mfa-proxy", "serve"]
