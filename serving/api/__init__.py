"""The HTTP API (OpenAI-style). Imports no torch."""
