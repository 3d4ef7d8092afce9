"""Business logic: authorisation, validation, dedupe, persistence, then publication.

Nothing here knows about HTTP or WebSocket; transports call these and map the errors.
"""
