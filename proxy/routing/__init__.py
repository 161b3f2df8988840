"""Which models to try: name to chain, cool-downs, observed latency and its categories."""
