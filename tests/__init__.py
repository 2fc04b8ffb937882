"""Tests for autopipeline-grpc."""
