"""The binary cache's data side: publishing build outputs, S3 uploads, retention."""
