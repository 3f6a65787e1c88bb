"""Builders of tiny real models (random weights, real architectures and tokenizers) for tests
and smoke runs. Nothing here downloads: tokenizers come from locally installed packages."""
