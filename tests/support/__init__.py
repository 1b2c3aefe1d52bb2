"""Shared helpers for the edgeroute test suite."""
