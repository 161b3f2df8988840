FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN pip install --no-cache-dir .
EXPOSE 8080
# Listen on all interfaces inside the container; give a config with GROQ_PROXY_CONFIG and the key with GROQ_API_KEY.
CMD ["groq-proxy", "serve", "--host", "0.0.0.0"]
