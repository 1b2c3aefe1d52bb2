"""Upstream provider adapters: translation and transport for each LLM API."""
