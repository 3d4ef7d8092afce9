"""Transports: parse and authenticate, call a service, render its answer."""
