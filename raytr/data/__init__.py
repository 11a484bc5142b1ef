"""The data half of raytr: raw events -> fitted NVTabular workflow -> session parquet -> batches."""
