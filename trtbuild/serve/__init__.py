"""trtbuild-serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the optional extra
`trtbuild[serve]`) over the runtime's in-flight batcher: concurrent requests join the running batch
between decode steps. protocol.py: the request bodies and the error body; app.py: the endpoints;
cli.py: the command."""
