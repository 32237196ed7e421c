# The OpenAI-compatible server and the web chat page (needs the `server` extra: fastapi, uvicorn).
