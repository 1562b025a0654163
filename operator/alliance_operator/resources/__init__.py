"""Pure manifest builders: dicts in, dicts out; no API calls, no clock, no environment."""
