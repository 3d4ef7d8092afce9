"""Blob stores: where uploaded files, thumbnails and archived transcripts live."""
