"""Shared test support: real processes on 127.0.0.1, tiny models, tiny datasets."""
