"""groq-proxy: an OpenAI-compatible gateway in front of Groq."""

__version__ = "0.1.0"
