"""Model catalog, cache, loaders and the built-in random stand-ins."""
