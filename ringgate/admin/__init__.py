"""Ringgate's Kong-compatible Admin API: entity CRUD, declarative /config, node info and status."""
