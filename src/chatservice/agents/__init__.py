"""AI responders: one protocol, a built-in demo backend and any OpenAI-compatible server."""
