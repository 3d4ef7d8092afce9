"""chat-service: a self-hosted real-time chat backend for people and AI agents."""

__version__ = "0.1.0"
