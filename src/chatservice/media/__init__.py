"""Upload helpers: content sniffing, safe file names and metadata-free thumbnails."""
