"""Readers and the ranking data set built from (query, answer) pairs."""
