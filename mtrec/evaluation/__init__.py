"""Model evaluation: paired bootstrap intervals and the promotion gate."""
