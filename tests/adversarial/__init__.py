"""Tests written from an adversarial review: each reproduces a defect found by attacking the code."""
