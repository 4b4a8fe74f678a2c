"""L7 (HTTP/1.1) traffic management in the node proxy: protocol core, router,
resilience layers (timeout, retry + budget, breaker, outlier), balancing,
mirroring and fault injection, composed by the one request pipeline (pipeline.py) behind its HTTP/1.1
and HTTP/2 adapters (h1stack.py, h2stack.py). See docs/traffic.md."""
