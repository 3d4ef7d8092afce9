"""Persistence: SQLAlchemy Core over SQLite or PostgreSQL, schema by Alembic."""
