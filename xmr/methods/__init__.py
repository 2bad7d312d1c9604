"""Method-specific code, one module per paper (what the shared modules do not cover)."""
