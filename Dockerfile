FROM python:3.11-slim
RUN useradd --system --create-home --home-dir /srv/mfa-proxy mfa-proxy
WORKDIR /srv/mfa-proxy
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY backends ./backends
COPY policy ./policy
COPY conf ./conf
RUN pip install --no-cache-dir ".[postgres]" && mkdir -p var && chown mfa-proxy var
USER mfa-proxy
EXPOSE 1812/udp 1813/udp 3389 9812
# Mount a config at /srv/mfa-proxy/conf/mfa-proxy.toml (listen on 0.0.0.0 there) and
# a volume at /srv/mfa-proxy/var for the state, key file and generated secrets.
CMD ["mfa-proxy", "serve"]
