"""`partinfer serve`: the OpenAI-compatible HTTP server and its chat page, over the runtime."""
