"""What the proxy tells the outside world: spans and their OTLP export, metrics, logs."""
