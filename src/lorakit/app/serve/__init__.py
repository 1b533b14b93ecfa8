"""``lorakit serve``: an OpenAI-compatible HTTP server over one base model and many LoRA adapters.

Data flow: ``command`` (flags, model, uvicorn) -> ``app`` (routes, auth, errors) ->
``completions`` (request -> engine -> JSON or server-sent events) -> ``engine`` (continuous
batching across adapters on one thread) -> ``batch`` (the running batch and its KV cache) and
``decode`` (sampling, text and stop strings); ``registry`` (known, resident and evicted
adapters), ``protocol`` (OpenAI's wire format), ``metrics`` (Prometheus).
"""
