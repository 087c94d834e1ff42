"""`calbench certify` (being written)."""
