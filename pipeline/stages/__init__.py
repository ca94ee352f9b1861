"""Curation stages, cheapest first. Each runs without Ray: `s = Stage(...); s.setup(); s(batch)`."""
