"""Which models to try, and how: name to chain (router), cool-downs, observed latency (latency, observed), a
request's plan (latency target, deadline, hedging), key pools, Groq's rate limits, the automatic tier."""
