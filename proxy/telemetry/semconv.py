"""The attribute names spans carry, taken from `opentelemetry-semantic-conventions` where it has them.

Resolved once, at import: the hot path reads module constants, never the package. The package version is
pinned in pyproject.toml (`~=0.66b2`), and `SCHEMA_URL` names the conventions release those names come from;
it is sent as the schema URL of every export. The GenAI names are still *Development* in the conventions,
which is why they live under `_incubating`: a new semconv release can rename them, and the pin keeps that a
deliberate change (tests/test_tracing.py fails when the installed package is newer than the pinned schema).
The `groq_proxy.*` names are the proxy's own.
"""

from __future__ import annotations

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as _gen_ai
from opentelemetry.semconv.attributes import error_attributes as _error
from opentelemetry.semconv.attributes import http_attributes as _http
from opentelemetry.semconv.attributes import server_attributes as _server
from opentelemetry.semconv.attributes import url_attributes as _url
from opentelemetry.semconv.schemas import Schemas

SCHEMA_URL = Schemas.V1_44_0.value

# Stable conventions (http, server, url, error).
HTTP_REQUEST_METHOD = _http.HTTP_REQUEST_METHOD
HTTP_RESPONSE_STATUS_CODE = _http.HTTP_RESPONSE_STATUS_CODE
HTTP_ROUTE = _http.HTTP_ROUTE
URL_PATH = _url.URL_PATH
SERVER_ADDRESS = _server.SERVER_ADDRESS
SERVER_PORT = _server.SERVER_PORT
ERROR_TYPE = _error.ERROR_TYPE

# GenAI conventions (Development).
GEN_AI_OPERATION_NAME = _gen_ai.GEN_AI_OPERATION_NAME
GEN_AI_PROVIDER_NAME = _gen_ai.GEN_AI_PROVIDER_NAME
GEN_AI_REQUEST_MODEL = _gen_ai.GEN_AI_REQUEST_MODEL
GEN_AI_REQUEST_MAX_TOKENS = _gen_ai.GEN_AI_REQUEST_MAX_TOKENS
GEN_AI_REQUEST_TEMPERATURE = _gen_ai.GEN_AI_REQUEST_TEMPERATURE
GEN_AI_RESPONSE_ID = _gen_ai.GEN_AI_RESPONSE_ID
GEN_AI_RESPONSE_MODEL = _gen_ai.GEN_AI_RESPONSE_MODEL
GEN_AI_RESPONSE_FINISH_REASONS = _gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
GEN_AI_USAGE_INPUT_TOKENS = _gen_ai.GEN_AI_USAGE_INPUT_TOKENS
GEN_AI_USAGE_OUTPUT_TOKENS = _gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
GEN_AI_INPUT_MESSAGES = _gen_ai.GEN_AI_INPUT_MESSAGES
GEN_AI_OUTPUT_MESSAGES = _gen_ai.GEN_AI_OUTPUT_MESSAGES

# The proxy's own.
REQUEST_ID = "groq_proxy.request_id"
VIRTUAL_MODEL = "groq_proxy.virtual_model"
ATTEMPTS = "groq_proxy.attempts"
STREAM = "groq_proxy.stream"
ANSWERED_BY = "groq_proxy.answered_by"
LATENCY_CATEGORY = "groq_proxy.latency_category"
ATTEMPT_INDEX = "groq_proxy.attempt.index"
ATTEMPT_OUTCOME = "groq_proxy.attempt.outcome"
ATTEMPT_REASON = "groq_proxy.attempt.reason"
TIME_TO_FIRST_CHUNK_MS = "groq_proxy.time_to_first_chunk_ms"
POLICY_DECISION = "groq_proxy.policy.decision"
ATTEMPT_KEY = "groq_proxy.attempt.key"  # the pool key by its variable's name, never its value
ATTEMPT_HEDGE = "groq_proxy.attempt.hedge"  # started in parallel with an attempt in flight
AUDIO_REQUEST_BYTES = "groq_proxy.audio.request_bytes"  # audio: the upload (or speech's input text), in bytes
AUDIO_RESPONSE_BYTES = "groq_proxy.audio.response_bytes"  # audio: the transcript, or speech's audio, in bytes
