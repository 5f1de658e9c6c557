"""Shared state: jobs, their events, datasets, registered losses and
replicas, stored in SQLite (embedded) or PostgreSQL (replicas). Both
``losses`` and ``training`` use it; it imports neither."""
