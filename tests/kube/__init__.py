"""Test doubles for Kubernetes: an in-memory API server (apiserver.py) for end-to-end tests."""
