"""Alembic migrations of the catalog schema, shipped inside the package (`lorafleet.db.upgrade`)."""
