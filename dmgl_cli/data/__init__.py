"""Data: preparers (raw files -> prepared arrays), the prepared-dataset reader, splits, the dataset registry."""
