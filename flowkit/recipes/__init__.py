"""Recipes: TOML files validated into typed, resolved configurations."""
