"""The OpenAI-compatible HTTP API: one module per endpoint, joined by services.api.app.create_app."""
