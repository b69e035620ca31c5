"""Helpers shared by the tests (tiny models, servers, fakes), imported as `support.<module>`."""
