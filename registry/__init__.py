"""Tenants' deltas: file formats, validation against the base, and the GPU slot pool."""
