"""Plugins: the contract (base), the registry of enabled plugins, per-route chains, bundled plugins."""
