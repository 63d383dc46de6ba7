"""An OpenAI-compatible chat completions server for SmolVLM models, with a web chat page.

    protocol.py  request schema, limits, OpenAI-style errors and response bodies
    images.py    `image_url` parts -> PIL images (data: URLs, optional http(s)), with size/pixel limits
    engine.py    one worker thread owns decoding; waiting requests are batched
    app.py       the FastAPI app: /v1/chat/completions, /v1/models, /health, the page at /

The `smolvlm serve` command (its options, loading the model, starting uvicorn) is smolvlm/cli/serve.py.
"""
