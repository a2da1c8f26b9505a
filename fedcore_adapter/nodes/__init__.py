"""Node families, one module (or package) each; each registers its kinds on import."""
