"""Front end (API server process): per-request options and the operator's rules for them."""
