"""Built-in models and data modules (no downloads: data is generated or shipped in packages)."""
