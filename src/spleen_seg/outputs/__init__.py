"""What a case writes beside its mask: the report and the preview."""
