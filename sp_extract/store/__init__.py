"""The HDF5 feature and match store: crash-safe writer, lock, part files, repair."""
