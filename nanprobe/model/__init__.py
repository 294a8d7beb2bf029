"""The report data model: plain frozen records that the formats render (no torch, no rich)."""
