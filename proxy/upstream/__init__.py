"""Talking to providers: the pooled HTTP/1.1 client, providers and the fall-over rule, the SSE scanner."""
