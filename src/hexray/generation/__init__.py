"""Live generation tracing and the chain-of-thought debugger."""
