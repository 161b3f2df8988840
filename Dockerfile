# groq-proxy in a container. Two stages: `build` installs the pinned dependencies (requirements.lock, written by
# deploy/lock_requirements.py) and then the package without resolving anything again, into a virtual
# environment; the final stage copies only that environment onto a fresh slim Python and runs it as an
# unprivileged user.
#
#   docker build -t groq-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 -e GROQ_API_KEY \
#     -v "$PWD/groq-proxy.toml:/config/groq-proxy.toml:ro" -e GROQ_PROXY_CONFIG=/config/groq-proxy.toml groq-proxy
#
# The config is read from the file GROQ_PROXY_CONFIG names (mount it read-only; compose.yaml mounts
# deploy/compose/groq-proxy.toml); without it the built-in default config is used. The proxy listens on
# 0.0.0.0:8080 inside the container: publish it on 127.0.0.1 unless others should reach it.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/groq-proxy
WORKDIR /src
COPY requirements.lock ./
RUN /opt/groq-proxy/bin/pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN /opt/groq-proxy/bin/pip install --no-deps . \
    && /opt/groq-proxy/bin/pip check

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin groq-proxy
COPY --from=build /opt/groq-proxy /opt/groq-proxy
ENV PATH=/opt/groq-proxy/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER groq-proxy:groq-proxy
EXPOSE 8080
# Liveness: /healthz answers 200 while the process serves. Python is in the image, so no curl is needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["groq-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
