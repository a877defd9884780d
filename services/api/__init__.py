"""The OpenAI-compatible HTTP API: one module per endpoint, joined by services.server.create_app."""
