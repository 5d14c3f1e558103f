"""Notifications of alarm episodes (SPEC §10): routes and channels (config), the outbox, the channels, the worker."""
