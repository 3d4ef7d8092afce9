"""Pub/sub between the services that publish events and the hubs that deliver them."""
