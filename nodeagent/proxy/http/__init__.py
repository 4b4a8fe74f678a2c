"""L7 (HTTP/1.1) traffic management in the node proxy: protocol core, router,
resilience layers (timeout, retry + budget, breaker, outlier), balancing,
mirroring and fault injection, composed by stack.py. See docs/traffic.md."""
