# The OpenAI-compatible server and the web chat page (needs the `server` extra: starlette, pydantic, uvicorn,
# prometheus_client): app.py (the route table and its handlers), openai.py (request schemas, errors),
# translate.py (requests to prompts, tokens to text), ops.py (Host/Content-Type guard, access log, metrics), web/.
