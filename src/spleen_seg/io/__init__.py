"""Readers and writers for medical image formats."""
