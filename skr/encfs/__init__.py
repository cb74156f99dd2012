"""``skr encfs``: encrypted filesystems from Azure blobs for apps that only read files (see README)."""
