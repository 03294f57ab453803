"""Images in: image sources (folders, webdataset shards, the demo set), streams and splits."""
