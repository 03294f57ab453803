"""Interoperability: foreign checkpoint layouts, the original projects' forward passes, and import."""
