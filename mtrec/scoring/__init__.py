"""Candidates and batched top-K ranking for the score stage."""
