"""Acquisition functions on MC-dropout samples (BALD, entropy, ...): filled by the adapters issue."""
