"""Diagnostics that show why a method works: FD-SNR against rank."""
