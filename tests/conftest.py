"""Shared pytest configuration."""

# scripts the tests start in network namespaces, not test modules
collect_ignore = ["live"]
