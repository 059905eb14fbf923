"""Diagnostics: finite checks, the localiser, guard policies and the precision doctor."""
