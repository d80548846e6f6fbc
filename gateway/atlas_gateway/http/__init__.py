"""ASGI plumbing (reading a body, sending an answer), the request headers and the OpenAI error
shape. Imports nothing else of the gateway."""
