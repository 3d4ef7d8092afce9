"""Test doubles that are real network servers (never mocks of our own code)."""
