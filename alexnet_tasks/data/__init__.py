"""Data preparation: download and verify the archive, split it, build the preprocessed HDF5 shards."""
